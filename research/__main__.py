"""The paper's claims, tested on a 2-core CPU: runs that leave committed records, tables built from them.

    python -m research primary               # kem and none, 5 pairs each with its own scenes (--data-seed),
                                            # beside the data-seed-0 pairs: the primary comparison
    python -m research ablation              # single-task baselines + 11 multi-task rows x 5 seeds -> Δm,
                                            # paired comparisons, learning curve, slot selection
    python -m research leak                  # the softmax leak at the model's own k values (a simulation)
    python -m research distractors           # distractor tokens, k fixed from the real tokens, probe AUC
    python -m research length                # kem and none trained 2x and 4x longer, 5 seeds: do the metrics
                                            # level off, does kem − none move with the length?
    python -m research imbalance             # kem and kem+etf slots, rare classes' semseg labels mostly ignored
                                            # vs the default split, 9 seeds: rare-class AUROC/AP, stability
    python -m research cue                   # a positive control: depth needs a cue only semseg's tokens get;
                                            # floor, oracle, cross, kem, dense and sparse cue, with distractors
    python -m research <name> --dry-run      # the plan: runs, how many are recorded, rough time
    python -m research <name> --tables-only  # rebuild the tables from the records alone
    python -m research <name> --help         # the knobs of each

How long, on 2 cores with --jobs 2 (two one-thread runs side by side): a kem run of 1,500 steps took
296-420 s on the project's 2-core machine (its speed drifts), and the ablation's 85 runs took 11.6
run-hours, about 6 h of the machine; the distractors take about 1.5-2 h after it, length 5.4
run-hours (about 2.8 h; 20 runs of 10-21 min), imbalance 36 two-task runs (about 10 min each beside
other work), leak about a minute. --dry-run re-estimates from the records' own
wall times (records marked with a "note" shared the machine with other work).

Records [ours]. Every finished run leaves one small JSON file, research/results/runs/<experiment>/<config>/
seed<k>.json: its flags, every task's full metric dict, speed, wall time, the eval history (for
learning curves) and, for KEM runs, the selection diagnostics. Checkpoints stay under runs/ (not
committed). A run whose record exists is never run again, so a later session on a fresh machine
continues where the last one stopped; with --commit each record is committed as it lands (only that
file). Every table is computed from the records alone: Δm against the single-task runs, and paired
comparisons (per-seed differences, their mean, a 95% t-interval, a paired t-test). Comparisons come in
families (primary, ablation Δm, selection, distractors, length), Holm-corrected within each: a
difference is "real" only where its Holm-adjusted p < 0.05, "suggestive" where only its own interval
excludes zero (research/stats.py). Unless a run sets --data-seed, every run trains on the same scenes:
such intervals cover training seeds only.

What the paper claims [paper] and how it is tested here [ours]:
0. The primary comparison, named first: kem against none (KEM helps multi-task learning), on kem's
   per-task relative difference against none (no single-task runs needed), at 1,500, 3,000 and 6,000
   steps and pooled over them (the ablation's and length's records, data seed 0), and with five new
   pairs whose data seed equals their training seed (5-9): `primary`. Its kem runs also log the
   gradient norms reaching KEM's selection against its values (the hidden command `_gradients`).
1. KEM beats cross-attention and no exchange (Δm against single-task baselines), and sKEM (the ETF
   variant) helps further. `ablation`: single-task baselines (the same network, one task, no
   exchange) and multi-task rows none / cross / kem / kem post / a k sweep / sKEM features, slots,
   both / "normalise only", compared paired by seed.
2. Softmax leaks mass onto irrelevant tokens, more as the tokens grow; top-k selection stops it.
   `leak` simulates one query at the k values the model uses. `distractors` adds tokens that carry
   nothing useful to the exchange's input, with k held at the real tokens' k (another image's task
   tokens, and Gaussian noise), and probes how easy they are to tell apart.
3. sKEM stabilises the slots' selection. `ablation` measures which tokens the slots select on the
   val set (overlap of their top-k sets; each slot's share of tokens per task).
   sKEM is motivated by KEM's sensitivity to imbalanced data. `imbalance` trains kem and kem+etf slots
   on the default split and on one where balls and cylinders mostly lose their semseg labels (images,
   other labels and val unchanged), and follows each slot's top-k set on fixed val images.
4. KEM's cost is linear in the tokens, cross-attention's quadratic: research/bench.py, not here.
Run length [ours]: the ablation's runs are the default run's 1,500 steps, where the val metrics are
still rising. `length` trains kem and none for 3,000 and 6,000 steps to show whether they level off
and whether the kem − none difference, paired by seed, moves with the length.

Where the code is (research/, one module per experiment, its logic and its report side by side):
    research/runner.py       the Run records, train.py child processes, --dry-run, the shared skeleton
    research/stats.py        t-intervals (logit for [0, 1] values), paired comparisons, families with Holm
    research/primary.py      kem − none on the relative scale, the data-seed pairs, the gradient log
    research/ablation.py     rows, Δm, comparisons, learning curve, slot-selection diagnostics
    research/leak.py         the one-query softmax / top-k simulation
    research/distractors.py  the distractor hooks, the linear probe, the hidden `_distract` command
    research/length.py       the longer runs and the paired kem − none per length
    research/imbalance.py    the imbalanced split, the hidden `_imbalance` command, the stability of the selection
    research/cue.py          the cue control: its data and network hooks, the hidden `_cue` command, fraction carried
Each module's docstring gives the experiment's design and its notes in full.
"""
import sys

from research import ablation, cue, distractors, imbalance, leak, length, primary

EXPERIMENTS = {"primary": primary.main, "ablation": ablation.main, "leak": leak.main, "distractors": distractors.main,
               "length": length.main, "imbalance": imbalance.main, "cue": cue.main,
               # hidden: the train.py processes of `distractors`, `primary` (kem runs), `imbalance` and `cue`
               "_distract": distractors.train_with_distractors, "_gradients": primary.train_with_gradient_log,
               "_imbalance": imbalance.train_imbalanced, "_cue": cue.train_with_cue}


def main(argv=None):
    """`python -m research <name> [...]`: the experiment's exit code (2 for no or an unknown name)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    if argv[0] not in EXPERIMENTS:
        names = ", ".join(n for n in EXPERIMENTS if not n.startswith("_"))
        print(f"python -m research: there is no experiment {argv[0]!r}; the experiments are {names} "
              "(`python -m research` describes each).", file=sys.stderr)
        return 2
    if argv[0].startswith("_"):                  # a train.py process with hooks: its exit code
        return EXPERIMENTS[argv[0]](argv[1:])
    EXPERIMENTS[argv[0]](argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
