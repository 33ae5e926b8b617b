import re

import pytest

from sasr.config import build_config, parse_set, valid_keys
from sasr.errors import SasrError


def test_defaults_and_layers(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: sft\nsteps: 12\ngrpo:\n  beta: 0.1\n")
    cfg = build_config(f, {"steps": 30, "task.name": None}, ["grpo.beta=0", "optim.learning_rate=1e-4"])
    assert cfg.method == "sft"  # file
    assert cfg.steps == 30  # flag beats file
    assert cfg.grpo.beta == 0.0  # --set beats file
    assert cfg.optim.learning_rate == pytest.approx(1e-4)  # '1e-4' parsed as a number
    assert cfg.task.name == "arithmetic"  # None flag leaves the default


def test_parse_set_values():
    assert parse_set("lora.target_modules=[q_proj, v_proj]") == ("lora.target_modules", ["q_proj", "v_proj"])
    assert parse_set("optim.max_grad_norm=null") == ("optim.max_grad_norm", None)
    assert parse_set("lora.enabled=false") == ("lora.enabled", False)
    with pytest.raises(SasrError, match="key=value"):
        parse_set("grpo.beta")


@pytest.mark.parametrize(
    "sets, message",
    [
        (
            ["grpo.num_generation=4"],
            "unknown config key 'grpo.num_generation' (did you mean 'grpo.num_generations'?)",
        ),
        (["optim.lerning_rate=1"], "did you mean 'optim.learning_rate'"),
        (["sasr.gamma=0"], "config key 'sasr.gamma': Input should be greater than 0"),
        (["sasr.gamma=-1"], "sasr.gamma"),
        (["chord.mu_peek=0.5"], "unknown config key 'chord.mu_peek' (did you mean 'chord.mu_peak'?)"),
        (["chord.variant=psi"], "config key 'chord.variant': Input should be 'mu' or 'phi'"),
        (["method=luffy", "luffy.num_demos=-1"], "config key 'luffy.num_demos'"),
        (
            ["grpo.num_generations=1"],
            "config key 'grpo.num_generations': Input should be greater than or equal to 2",
        ),
        (["grpo.loss_type=ppo"], "grpo.loss_type"),
        (["warmup_steps=40", "steps=40"], "warmup_steps (40) must be shorter than steps (40)"),
        (["method=sasr-v2"], "unknown method 'sasr-v2' (did you mean 'sasr'?); valid: sasr, sft, grpo"),
        (["warmup_steps=0"], "needs warmup_steps >= 1"),
    ],
)
def test_bad_values_name_the_key(sets, message):
    with pytest.raises(SasrError) as err:
        build_config(sets=sets)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_task_options_pass_through_and_bad_yaml(tmp_path):
    cfg = build_config(sets=["task.max_terms=3"])
    assert cfg.task.options() == {"max_terms": 3}
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(SasrError, match="bad.yaml' line 2 is not valid YAML"):
        build_config(bad)
    with pytest.raises(SasrError, match="does not exist"):
        build_config(tmp_path / "missing.yaml")
    nested_unknown = tmp_path / "n.yaml"
    nested_unknown.write_text("grpo:\n  betta: 0.1\n")
    with pytest.raises(SasrError, match="did you mean 'grpo.beta'"):
        build_config(nested_unknown)


def test_every_documented_option_is_settable():
    for key in [
        "optim.learning_rate",
        "sft.batch_size",
        "grpo.num_generations",
        "grpo.max_completion_length",
        "grpo.temperature",
        "grpo.beta",
        "grpo.epsilon",
        "grpo.epsilon_high",
        "grpo.loss_type",
        "grpo.scale_rewards",
        "sasr.gamma",
        "sasr.probe_every",
        "interleave.prob",
        "interleave.period",
        "sft-then-grpo.switch_step",
        "chord.variant",
        "hpt.gate",
        "luffy.shaping_gamma",
        "srft.sft_coef",
        "demos.task",
        "lora.r",
        "lora.alpha",
        "lora.target_modules",
        "lora.enabled",
        "model.dtype",
        "grpo.reference",
    ]:
        assert key in valid_keys()


def test_the_options_reference_matches_the_schema_both_ways():
    """Every option of the schema (methods' included) is in docs/options.md with its description and default,
    and the table holds no key the schema lacks."""
    from pathlib import Path

    from sasr.config import option_rows, options_table

    page = (Path(__file__).parent.parent / "docs" / "options.md").read_text()
    start = page.index("| key | default | what it does |")
    end = page.find("\n\n", start)
    table = page[start : end if end != -1 else len(page)]
    documented = {m.group(1) for m in re.finditer(r"^\| `([a-z0-9_.-]+)` \|", table, re.M)}
    schema = {key for key, _, _ in option_rows()}
    assert schema - documented == set(), "options missing from docs/options.md"
    assert documented - schema == set(), "docs/options.md has keys the schema does not"
    assert options_table() in page, "docs/options.md is stale: run python tools/doc_tables.py"
    assert all(text for _, _, text in option_rows()), "every option needs a one-line description"


def test_the_comparison_recipes_evaluate_256_questions_per_split():
    from pathlib import Path

    from sasr.config import build_config

    recipes = sorted((Path(__file__).parents[1] / "configs").glob("compare_*.yaml"))
    assert len(recipes) >= 3
    for recipe in recipes:
        assert build_config(recipe).task.test_size >= 256, recipe.name


def test_the_2026_two_stage_presets_are_the_papers_recipe_scaled():
    """configs/presets/sft-then-rl-2026*.yaml: 3 epochs of SFT on a cosine with 10% warm-up to 0.1 x peak,
    then 500 (or 50) RL steps at a constant rate 50 (or 10) times lower with a fresh optimiser, clip 0.2 / 0.28,
    no KL, no std."""
    from pathlib import Path

    from sasr.config import build_config

    presets = Path(__file__).parents[1] / "configs" / "presets"
    long, short = (build_config(presets / f"sft-then-rl-2026{s}.yaml") for s in ("", "-short"))
    for c in (long, short):
        o = c.method_options("sft-then-grpo")
        assert c.method == "sft-then-grpo" and o["switch_step"] * c.sft.batch_size == 3 * c.task.train_size
        assert (o["sft_warmup_ratio"], o["sft_lr_floor"], o["sft_weight_decay"]) == (0.1, 0.1, 0.01)
        assert (c.grpo.epsilon, c.grpo.epsilon_high, c.grpo.beta, c.grpo.scale_rewards) == (
            0.2,
            0.28,
            0.0,
            "none",
        )
        assert c.grpo.loss_type == "dapo" and c.grpo.num_generations == 8
        assert o["rl_fresh_optimizer"]  # the RL stage a new run from the SFT checkpoint
    assert (long.steps - 750, short.steps - 750) == (500, 50)
    lo, so = long.method_options("sft-then-grpo"), short.method_options("sft-then-grpo")
    assert lo["sft_learning_rate"] / lo["rl_learning_rate"] == pytest.approx(50)
    assert so["rl_learning_rate"] / lo["rl_learning_rate"] == pytest.approx(5)


def test_report_to_takes_the_trackers_sasr_trackers_registers():
    from sasr.config import validate
    from sasr.trackers import TRACKERS

    assert validate({"report_to": list(TRACKERS)}).report_to == list(TRACKERS)
    with pytest.raises(Exception, match="unknown tracker 'wandbb' \\(did you mean 'wandb'\\?\\)"):
        validate({"report_to": "wandbb"})
