import pytest

from sasr import models
from sasr.errors import SasrError


def test_tiny_is_deterministic_and_has_chat_template():
    a, b = models.load_model("tiny"), models.load_model("tiny")
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters()))
    tok = models.load_tokenizer("tiny")
    assert tok.padding_side == "left" and tok.pad_token is not None and tok.chat_template


def test_folder_and_hub_style_loading(tmp_path):
    """A save_pretrained folder loads like a hub checkout; the path users take with real models."""
    m = models.load_model("tiny")
    models.load_tokenizer("tiny").save_pretrained(tmp_path / "m")
    m.save_pretrained(tmp_path / "m")
    again = models.load_model(str(tmp_path / "m"))
    assert all((p == q).all() for p, q in zip(m.parameters(), again.parameters()))


def test_bad_model_specs(tmp_path):
    with pytest.raises(SasrError, match="neither a folder, a hub id.*aliases: smollm2-135m, tiny"):
        models.load_model("smollm3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SasrError, match="has no config.json"):
        models.load_model(str(tmp_path / "empty"))
    with pytest.raises(SasrError, match="cannot load model 'nobody/no-such-model'"):
        models.load_model("nobody/no-such-model")  # offline: no hub, one sentence


def test_smollm2_alias_converts_and_runs():
    """The real model: converted from the packaged GGUF once, cached, a chat model of 134.5M parameters."""
    model = models.load_model("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert not hasattr(model.config, "quantization_config")
    tok = models.load_tokenizer("smollm2-135m")
    msgs = [{"role": "user", "content": "Hi"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3


def test_processes_that_build_the_cache_at_once_all_load_it(tmp_path):
    """The ranks of a first multi-process launch all find the cache empty and build it together."""
    import os
    import subprocess
    import sys

    code = (
        "from sasr import models; print(sum(p.sum().item() for p in models.load_model('tiny').parameters()))"
    )
    env = {**os.environ, "SASR_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 2, outs[0][1][-2000:]
    assert len({out for out, _ in outs}) == 1  # the same weights everywhere
    assert not list((tmp_path / "models").glob("*.tmp*"))  # no temporary folder left
