"""The mutation pass of docs/mutation-pass.md: put one small, plausible bug into the code, run
the fast tests that should catch it, restore the file; report caught / not caught per mutation.

    .venv/bin/python scripts/mutation_pass.py [--only ID,ID] [--files tests/a.py,tests/b.py]

Each mutation replaces exactly one occurrence of a line fragment (the script stops if the fragment
is not there exactly once, e.g. after a refactoring: update the table). The file is restored with
``git checkout`` whatever happens, so it must have no uncommitted change to start with.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

EVAL = ["tests/test_metrics.py", "tests/test_asr_protocol.py", "tests/test_targeted.py", "tests/test_preprocess.py"]
TRAIN = ["tests/test_train.py", "tests/test_roclip.py", "tests/test_augment.py"]
ATTACKS = ["tests/test_badnet.py", "tests/test_blended.py", "tests/test_sig_lc.py", "tests/test_wanet.py",
           "tests/test_targeted.py", "tests/test_asr_protocol.py"]
GRID = ["tests/test_grid.py", "tests/test_cli.py", "tests/test_store.py", "tests/test_registry.py", "tests/test_report.py"]
NEW = ["tests/test_protocol_invariants.py"]

# (id, file, fragment, replacement, what the bug does, test files that should catch it)
MUTATIONS = [
    ("zs-renorm", "benchmark/evaluate.py", "weights.append(F.normalize(emb.mean(0), dim=-1))",
     "weights.append(emb.mean(0))", "zero-shot classifier not renormalised after averaging templates", EVAL),
    ("logit-cap", "benchmark/train.py", "MAX_LOGIT_SCALE = math.log(100.0)", "MAX_LOGIT_SCALE = 100.0",
     "logit scale clamped at 100 instead of ln(100)", TRAIN),
    ("logit-clamp", "benchmark/train.py", "model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)",
     "model.logit_scale.clamp_(0, 100)", "the clamp after each step caps the log-scale at 100", TRAIN),
    ("probe-on-eval", "benchmark/runner.py", "probe_feats, probe.labels, eval_feats, ev.labels",
     "eval_feats, ev.labels, eval_feats, ev.labels", "linear probe fitted on the evaluation features", EVAL),
    ("probe-refit-test", "benchmark/metrics.py", "final = model(best).fit(x, y)",
     "final = model(best).fit(test_x.double().numpy(), test_y.numpy())",
     "linear probe's final fit on the test features", EVAL),
    ("zs-no-unit-templates", "benchmark/evaluate.py", "emb = F.normalize(model.encode_text(tokens).float(), dim=-1)",
     "emb = model.encode_text(tokens).float()", "template embeddings averaged before normalising", EVAL),
    ("topk-k", "benchmark/evaluate.py", "return (topk[:, :k] == labels.unsqueeze(1))",
     "return (topk[:, :1] == labels.unsqueeze(1))", "top-k accuracy looks at the first column only", EVAL),
    ("asr-all-images", "attacks/backdoor.py", "keep = data.eval.labels != target\n        if not keep.any():",
     "keep = data.eval.labels >= 0\n        if not keep.any():", "backdoor ASR counts target-class images too", ATTACKS),
    ("asr-n", "attacks/backdoor.py", '"asr_n": int(keep.sum()),', '"asr_n": len(keep),',
     "asr_n counts every evaluation image", ATTACKS),
    ("nontarget-triggered", "attacks/backdoor.py", "(clean == data.eval.labels[keep])",
     "(top1 == data.eval.labels[keep])", "clean_top1_nontarget measured on the triggered images", ATTACKS),
    ("recall-ties", "benchmark/metrics.py", "rank = (s >= true).sum(dim=1) - 1", "rank = (s > true).sum(dim=1)",
     "retrieval ties counted for the query", EVAL),
    ("recall-t2i", "benchmark/metrics.py", '("t2i", sim.T)', '("t2i", sim)',
     "text-to-image recall computed on the image-to-text similarities", EVAL),
    ("warmup", "benchmark/train.py", "return (step + 1) / warmup", "return step / warmup",
     "warm-up starts at lr 0 and peaks one step late", TRAIN),
    ("cosine", "benchmark/train.py", "progress = (step - warmup) / max(1, total - warmup)",
     "progress = step / max(1, total)", "cosine decay counted from step 0, not from the end of warm-up", TRAIN),
    ("wd-1d", "benchmark/train.py", "skip = p.ndim < 2 or ", "skip = ",
     "weight decay on 1-D parameters (class embedding, ...)", TRAIN),
    ("infonce-asym", "benchmark/losses.py", "F.cross_entropy(logits.T, labels)", "F.cross_entropy(logits, labels)",
     "InfoNCE image-to-text only (not symmetric)", TRAIN),
    ("infonce-labels", "benchmark/losses.py", "labels = torch.arange(logits.shape[0], device=logits.device)",
     "labels = torch.arange(logits.shape[0], device=logits.device).flip(0)",
     "InfoNCE positives in the wrong order", TRAIN),
    ("roclip-epochs", "defenses/roclip.py", "return epoch % self.params.match_every == 0",
     "return (epoch - 1) % self.params.match_every == 0", "RoCLIP matches from epoch 1 on (0-indexed epochs)", TRAIN),
    ("roclip-enqueue-first", "defenses/roclip.py",
     "matched = self.pool.nearest(image_emb)  # queried before this batch is enqueued\n        self._enqueue(text_emb)",
     "self._enqueue(text_emb)\n        matched = self.pool.nearest(image_emb)",
     "RoCLIP pool queried after the current batch is enqueued", TRAIN),
    ("trigger-clamp", "attacks/backdoor.py", "fn(images[i : i + chunk].float()).round_().clamp_(0, 255)",
     "fn(images[i : i + chunk].float()).round_()", "triggered pixels not clamped to 0..255 (uint8 wrap-around)",
     ATTACKS),
    ("caption-source-class", "attacks/backdoor.py", "captions = class_captions(data, target, n,",
     "captions = class_captions(data, int(data.train.labels[src[0]]), n,",
     "poisoned captions name the source image's class, not the target", ATTACKS),
    ("poison-rate", "attacks/backdoor.py", "return int(round(r * n_clean / (1.0 - r)))",
     "return int(round(r * n_clean))", "poison_rate taken as a share of the clean pairs", ATTACKS),
    ("targeted-true-class", "attacks/targeted.py", "offset = torch.randint(1, n_classes, (len(rows),),",
     "offset = torch.randint(0, n_classes, (len(rows),),", "targeted: the adversarial class may be the true class", ATTACKS),
    ("targeted-asr-top5", "attacks/targeted.py", "success = top5[:, 0] == adversarial",
     "success = (top5 == adversarial[:, None]).any(1)", "targeted ASR counts a top-5 hit as success", ATTACKS),
    ("patch-last-row", "attacks/badnet.py", "rows = torch.randint(0, height - size + 1, (n,), generator=g)",
     "rows = torch.randint(0, height - size, (n,), generator=g)", "random patch never on the last row", ATTACKS),
    ("seed-range", "benchmark/grid.py", "range(lo, hi + 1)", "range(lo, hi)", "seed range 0-2 runs 0 and 1", GRID),
    ("skip-done-cell", "benchmark/runner.py", "if not force and has_finished_row(results, cell.cfg.run_id):",
     "if force and has_finished_row(results, cell.cfg.run_id):", "a done cell is trained again", GRID),
    ("retry-failed", "benchmark/cli.py",
     'check_nproc(nproc, device)\n    pending = cfgs if force else [c for c in cfgs if state(c, results) != "done"]',
     'check_nproc(nproc, device)\n    pending = cfgs if force else [c for c in cfgs if state(c, results) == "pending"]',
     "a failed cell is not retried by the next bench run", GRID),
    ("all-includes-none", "benchmark/grid.py", 'if getattr(registry.get(n), "poisons", True)]', "]",
     "`all` runs the clean baseline as an attack", GRID),
]


def run(files: list[str]) -> tuple[bool, str]:
    """(caught, the first failing test) of the fast tests in ``files``."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider", *files]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out.stdout, re.M)
    return out.returncode != 0, (failed[0] if failed else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma list of mutation ids (default: all)")
    ap.add_argument("--files", default="", help="comma list of test files, replacing each mutation's own")
    ap.add_argument("--with-new", action="store_true", help=f"add {', '.join(NEW)} to each mutation's files")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    for mid, file, old, new, what, files in MUTATIONS:
        if only and mid not in only:
            continue
        path = ROOT / file
        if subprocess.run(["git", "diff", "--quiet", "--", file], cwd=ROOT).returncode != 0:
            sys.exit(f"{file} has uncommitted changes; commit or stash them first")
        text = path.read_text()
        if text.count(old) != 1:
            sys.exit(f"{mid}: the fragment occurs {text.count(old)} times in {file}, not once: update MUTATIONS")
        first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))  # first changed character
        line = text[: text.index(old) + first].count("\n") + 1
        chosen = args.files.split(",") if args.files else files + (NEW if args.with_new else [])
        try:
            path.write_text(text.replace(old, new))
            caught, test = run(chosen)
        finally:
            subprocess.run(["git", "checkout", "--", file], cwd=ROOT, check=True)
        print(f"{mid}\t{file}:{line}\t{'caught' if caught else 'NOT CAUGHT'}\t{test}\t{what}", flush=True)


if __name__ == "__main__":
    main()
