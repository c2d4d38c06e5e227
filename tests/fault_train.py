"""training/train.py with a fault installed through the trainer's hook (training/trainer.py): SIGKILLs this
process at one step's event -- no cleanup, no atexit, as a preempted node dies.

    python tests/fault_train.py 6:mid_save [train.py arguments ...]     # what run_train(fault=...) launches
"""
import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.train import main  # noqa: E402  (after the path: the launchers run this as a script)


def kill_at(step: int, event: str):
    def hook(ev: str, s: int) -> None:
        if (ev, s) == (event, step):
            logging.getLogger("tunesmith.train").warning("fault %d:%s: SIGKILL now", step, event)
            for h in logging.getLogger().handlers:
                h.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


if __name__ == "__main__":
    at, event = sys.argv[1].split(":")
    assert event in ("mid_save", "after_step"), event
    sys.exit(main(sys.argv[2:], hooks=[kill_at(int(at), event)]))
