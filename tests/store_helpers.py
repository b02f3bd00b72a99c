"""Helpers shared by tests of the results store and of runs in subprocesses."""
import os

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def temp_files(folder):
    """Temp files of atomic writes (``.<name>.*.tmp``) anywhere under ``folder``."""
    return sorted(p for p in folder.rglob(".*.tmp") if p.is_file())


def stored_row(run_id, status, top1):
    return {"run_id": run_id, "status": status, "attack": "badnet", "defense": "clip", "profile": "tiny", "seed": 0,
            "clean_top1": top1, "asr": 0.5, "asr_n": 10}
