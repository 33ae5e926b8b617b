"""Several `sasr train` commands in one `accelerate launch` (the same processes run them one after another),
so that tests of many methods under several processes pay the processes' start once. Its argument is a JSON
file: a list of steps, each {"argv": [...]} (a `sasr train` command line; all must succeed) or
{"copy": [SRC, DST], "drop": [NAME, ...]} (the main process copies a run directory and drops some of it,
as after a crash; the others wait)."""

import json
import shutil
import sys
from pathlib import Path

from accelerate import PartialState

from sasr.cli import main

for step in json.loads(Path(sys.argv[1]).read_text()):
    if "argv" in step:
        code = main(["train", *step["argv"]])
        if code != 0:
            sys.exit(code)
        continue
    state = PartialState()
    if state.is_main_process:
        source, target = map(Path, step["copy"])
        shutil.copytree(source, target)
        for name in step.get("drop", []):
            shutil.rmtree(target / name)
    state.wait_for_everyone()
