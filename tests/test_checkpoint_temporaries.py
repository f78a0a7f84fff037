"""A kill -9 at any point of a checkpoint save or a model export leaves only temporaries that the next run's
start-up (`training.rundir.remove_leftovers`) removes, and the newest intact checkpoint stays loadable.

One subprocess builds a tiny model, then forks a child per kill point: the child counts every file-system change
(an audit hook on opening for writing, renaming, creating and removing) and SIGKILLs itself just before the k-th,
for k = 1, 2, ... until a save completes; the parent then runs the start-up cleanup on what the child left.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

KILLER = r"""
import json, os, shutil, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from lightgen_model import LightGen, preset, save_pretrained
from training import checkpoint as ckpt_io
from training.rundir import remove_leftovers

work = Path(sys.argv[2])
torch.manual_seed(0)
model = LightGen(preset("debug"))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ema = {k: v.clone() for k, v in model.state_dict().items()}
WRITES = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.symlink"}


def counts(event, args):
    if event in WRITES:
        return True
    if event == "open":
        _, mode, flags = args
        return (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    return False


def save_checkpoint(out):
    ckpt_io.save(out / "checkpoints", 4, model=model, ema_state=ema, optimizer_state=opt.state_dict(),
                 state={"kind": "pretrain", "elapsed_s": 1.0, "nonfinite": 0, "loader": {"epoch": 0, "index": 8},
                        "schedule_total": None}, keep_last=1)


def export_new(out):
    save_pretrained(model, out / "model", ema)


def export_over(out):
    save_pretrained(model, out / "model", None)  # over an existing export that has an EMA file


def killed_at(k, action, out):
    pid = os.fork()
    if pid == 0:
        seen = [0]

        def hook(event, args):
            if counts(event, args):
                seen[0] += 1
                if seen[0] == k:
                    os.kill(os.getpid(), signal.SIGKILL)

        sys.addaudithook(hook)
        action(out)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


template = work / "template"
save_checkpoint(template)  # step 4 exists; the saves below write step 4 again (a resumed run's first save)
os.rename(template / "checkpoints" / "step-00000004", template / "checkpoints" / "step-00000002")
doc = json.loads((template / "checkpoints/step-00000002/state.json").read_text())
doc["step"] = 2
doc["checksum"] = ckpt_io.state_checksum(doc)
(template / "checkpoints/step-00000002/state.json").write_text(json.dumps(doc))
export_new(template)
report = {}
for name, action in (("checkpoint", save_checkpoint), ("export_new", export_new), ("export_over", export_over)):
    rows = []
    for k in range(1, 200):
        out = work / f"{name}-{k}"
        shutil.copytree(template, out)
        if name == "export_new":
            shutil.rmtree(out / "model")
        killed = killed_at(k, action, out)
        removed = [str(p.relative_to(out)) for p in remove_leftovers(out)]
        left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if "tmp" in p.name)
        best, _ = ckpt_io.latest_valid(out / "checkpoints")
        rows.append({"k": k, "killed": killed, "removed": removed, "left": left, "latest": best and best.name})
        shutil.rmtree(out)
        if not killed:
            break
    report[name] = rows
print(json.dumps(report))
"""


def test_a_kill_at_any_point_of_a_save_leaves_nothing_that_start_up_keeps(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-c", KILLER, str(ROOT), str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    for name, rows in report.items():
        assert len(rows) >= 4 and not rows[-1]["killed"], (name, rows)  # several kill points, then a full save
        for row in rows:
            assert row["left"] == [], (name, row)  # every temporary was one the start-up cleanup knows
            if name == "checkpoint":
                assert row["latest"] in ("step-00000002", "step-00000004"), row
        if name == "checkpoint":
            assert any(r["removed"] for r in rows) and rows[-1]["latest"] == "step-00000004", rows
