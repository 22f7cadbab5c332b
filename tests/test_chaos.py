"""Chaos: a tiny training run SIGKILLed at moments a seeded RNG picks - between steps, while a
checkpoint is being written, while the export is being written (those two found by watching the
files appear) - and resumed each time ends as the uninterrupted run ends: every step logged once,
the same exported EMA weights and the same optimizer state in the final checkpoint. A half-written
checkpoint is never resumed from, and a good export survives a kill during the next export.
"The same" is one machine's promise in one process layout (tests/test_train.py's docstring)."""
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cascade.config import load_config
from tests.test_nan_guard import checkpoint
from tests.test_train import TINY_VAE, clean_env, read_log

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 24, 4                                  # checkpoints at 4, 8, ..., 24
SETTINGS = [*TINY_VAE, f"train.steps={STEPS}", f"train.ckpt_every={EVERY}", "train.keep_ckpts=2"]
SEED = 17

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


class Run:
    """One run folder trained by `cascade train` processes, each launched, watched and maybe killed."""

    def __init__(self, out: Path):
        self.out, self.ckpts, self.launches = out, out / "checkpoints", []

    def launch(self):
        log = open(self.out.parent / f"{self.out.name}-{len(self.launches)}.txt", "w")
        argv = [sys.executable, "-m", "cascade.cli", "train", str(REPO / "configs/tiny/vae.yaml"), *SETTINGS,
                f"train.out_dir={self.out}", "--no-progress"]
        proc = subprocess.Popen(argv, cwd=REPO, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
        self.launches.append(log.name)
        return proc

    def output(self, i: int = -1) -> str:
        return Path(self.launches[i]).read_text()

    def kill_when(self, moment, delay: float = 0.0, timeout: float = 240) -> bool:
        """Launch, poll the files every half millisecond until moment() holds, wait `delay`
        seconds, SIGKILL; False when the process ended first (it must then have succeeded)."""
        proc, deadline = self.launch(), time.time() + timeout
        while not moment():
            if proc.poll() is not None:
                assert proc.returncode == 0, self.output()
                return False
            assert time.time() < deadline, "the watched moment never came"
            time.sleep(0.0005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True

    def finish(self) -> str:
        proc = self.launch()
        assert proc.wait(timeout=300) == 0, self.output()
        return self.output()

    def logged(self) -> int:
        try:
            return max(0, len((self.out / "log.csv").read_text().splitlines()) - 1)
        except OSError:
            return 0

    def complete_checkpoints(self) -> list[int]:
        return sorted(int(p.parent.name[4:]) for p in self.ckpts.glob("step*/state.json"))

    def export_leftovers(self) -> list[Path]:
        return [*self.out.glob(".export.tmp-*"), *self.out.glob(".export.old-*")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (in this process, one thread as the killed runs have)."""
    from cascade.train import train
    out = tmp_path_factory.mktemp("reference") / "run"
    train(load_config(REPO / "configs/tiny/vae.yaml", SETTINGS + [f"train.out_dir={out}"]), progress=False)
    return out


def resumed_from(run: Run) -> int:
    """The step the last launch resumed from (0: it started over)."""
    out = run.output()
    marker = f"resumed from {run.ckpts}/step"
    return int(out.split(marker)[1].split()[0]) if marker in out else 0


def test_killed_at_random_moments_ends_as_the_uninterrupted_run(reference, tmp_path):
    from cascade.stages import load_export
    from cascade.train import checkpoint_tags
    rng = random.Random(SEED)
    run = Run(tmp_path / "run")

    # 1. between steps, after a random number of logged steps
    n = rng.randint(EVERY + 1, 3 * EVERY - 1)
    assert run.kill_when(lambda: run.logged() >= n)
    kept = run.complete_checkpoints()
    assert kept and run.logged() < STEPS

    # 2. while a checkpoint is being written: its folder has appeared, its state.json not yet
    mid_checkpoint = None
    for target in range(max(kept) + 2 * EVERY, STEPS + 1, EVERY)[:3]:    # a later one if it was too fast
        assert run.kill_when(lambda: (run.ckpts / f"step{target}").is_dir(), rng.uniform(0, 0.01))
        assert resumed_from(run) == max(kept)
        kept = run.complete_checkpoints()
        if not (run.ckpts / f"step{target}" / "state.json").exists():
            mid_checkpoint = target
            break
    assert mid_checkpoint, "no kill landed inside a checkpoint write"
    partial = sorted(p.name for p in (run.ckpts / f"step{mid_checkpoint}").iterdir())
    print(f"killed after {n} steps; inside the checkpoint step{mid_checkpoint} (holding {partial})")
    assert checkpoint_tags(run.ckpts)[0] == f"step{mid_checkpoint - EVERY}", partial   # never the partial one
    assert max(kept) == mid_checkpoint - EVERY

    # 3. run to the end: a first, good export
    run.finish()
    assert resumed_from(run) == mid_checkpoint - EVERY, partial
    good = Path(shutil.copytree(run.out / "export", tmp_path / "good_export"))
    _, good_state = load_export(good)

    # 4. while the next export is being written (the same command again resumes at the last
    #    step and exports again): its temporary folder has appeared, its leftovers not gone yet
    mid_export = False
    for _ in range(3):
        assert run.kill_when(lambda: bool(list(run.out.glob(".export.tmp-*"))), rng.uniform(0, 0.005))
        assert resumed_from(run) == STEPS
        _, state = load_export(run.out / "export")         # the old or the new export, whole (checksums)
        assert state.keys() == good_state.keys() and all(torch.equal(state[k], good_state[k]) for k in state)
        if run.export_leftovers():
            mid_export = True
            print(f"killed inside an export, leaving {sorted(p.name for p in run.export_leftovers())}")
            break
    assert mid_export, "no kill landed inside an export"

    # 5. the last resume: nothing left over, every step once, the uninterrupted run's end state
    run.finish()
    assert resumed_from(run) == STEPS and not run.export_leftovers()
    rows, ref_rows = read_log(run.out / "log.csv"), read_log(reference / "log.csv")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r, ref in zip(rows, ref_rows):
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7), r["step"]
    _, ours = load_export(run.out / "export")
    _, theirs = load_export(reference / "export")
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-7)
    a, b = checkpoint(run.out, STEPS), checkpoint(reference, STEPS)
    assert a["lr"] == b["lr"] and a["ema_updates"] == b["ema_updates"]
    torch.testing.assert_close(a["adam"], b["adam"], rtol=1e-5, atol=1e-8)   # exp_avg, exp_avg_sq, step
    torch.testing.assert_close(a["module"], b["module"], rtol=1e-5, atol=1e-7)


def test_export_killed_between_the_fallbacks_two_renames_is_put_back(tmp_path, monkeypatch):
    """Where the system cannot swap two folders, export renames the old one aside and the new one
    into place; a kill between the two leaves no export, only the old one aside: the next export
    puts it back before it writes, so a failing next export still leaves the old one."""
    import errno
    import cascade.train as train_mod
    from cascade.checksums import verify_checksums
    cfg = load_config(REPO / "configs/tiny/vae.yaml", TINY_VAE)
    folder = train_mod.export(cfg, {"w": torch.ones(3)}, tmp_path / "export")
    folder.rename(tmp_path / ".export.old-4242")           # the kill between the renames
    (tmp_path / ".export.tmp-abcd").mkdir()                # and the new one it never renamed
    monkeypatch.setattr(train_mod, "swap_paths", lambda a, b: False)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train_mod, "write_checksums", full)
    with pytest.raises(OSError):
        train_mod.export(cfg, {"w": torch.zeros(3)}, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert torch.equal(train_mod.load_file(str(folder / "model.safetensors"))["w"], torch.ones(3))
    assert verify_checksums(folder)
    monkeypatch.undo()
    train_mod.export(cfg, {"w": torch.zeros(3)}, tmp_path / "export")  # and a working one replaces it
    assert torch.equal(train_mod.load_file(str(folder / "model.safetensors"))["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
