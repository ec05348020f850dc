"""Memory and time of the loss's tail end: final hidden states → LM head → log-softmax → forward
KL(T‖S) → backward to the student's hidden states, for one row of T response tokens.

Two ways to do it:
  naive  what peers do: both sides' full (T, V) logits and log-probabilities live at once,
         token_divergence over all of them, mean, backward through autograd.
  ours   chunked_head.ChunkedHead: the LM head and token_divergence run over chunks of positions,
         the teacher's chunk logits under no_grad, each chunk's gradient taken on the spot
         (the per-token function selfdistill.sd_loss passes, minus its entropy metric and its
         optional A_t; --entropy also times it with the metric, as every training step runs it).

Each run is its own subprocess, naive and ours alternating, so each peak is clean: peak extra
memory = the process's peak resident set (VmHWM, reset after the inputs exist) minus its resident
set then; MB here are MiB. Time is the median over --repeats runs of the step alone (inputs are
built before the clock starts). The two must give the same loss (rel 1e-5) and gradient.

    python benchmarks/bench_divergence.py --quick          # seconds: V=8192, d=256, T=512
    python benchmarks/bench_divergence.py                  # Qwen3-1.7B head: V=151936, d=2048, T=2048
    python benchmarks/bench_divergence.py --chunk 0        # the chunk from chunked_head.CHUNK_LOGITS_MB
    python benchmarks/bench_divergence.py --T 512 --chunk 192

The last line is key=value pairs; the targets are memory_ratio <= 0.125 at time_ratio <= 1.2.
They are about the full size: --quick only shows the script working, its ratios are dominated by
fixed costs (library set-up, per-chunk overhead) and mean nothing. On a 2-core CPU the full size
takes 30-40 s per run, ~6 min in all with 3 repeats and --entropy. --chunk defaults to the
training default (selfdistill.Config.chunk_size). What moves the ratio, measured on a 2-core
AMD EPYC machine (docs/performance.md): the matmuls' speed on C rows (slower at 128 than at 192 or
2,048, more so on 2 threads), and the naive side's page faults on its 8 GB, whose cost varies from
machine to machine and hour to hour; the chunked side's extra passes do not (entropy ≈ +3 %).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from chunked_head import ChunkedHead, chunk_positions  # noqa: E402
from selfdistill import Config, token_divergence  # noqa: E402


def memory_mb(key):
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


def reset_peak():
    """Make VmHWM forget everything before now (Linux ≥ 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_inputs(V, d, T, seed=0):
    """A frozen LM head (V, d) and both rows' final hidden states (T, d); logits have std ≈ 2 and
    the teacher's hidden states are the student's plus noise, so KL(T‖S) is about 1 per token."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, d, generator=g).mul_(2 / d ** 0.5)  # in place: no second (V, d) copy
    student_h = torch.randn(T, d, generator=g)
    teacher_h = student_h + 0.5 * torch.randn(T, d, generator=g)
    return weight, student_h.requires_grad_(True), teacher_h


# ---------------------------------------------------------------------------------------------
# The two ways

def naive_step(student_h, teacher_h, weight, chunk):
    student_logits = student_h @ weight.T  # (T, V) with its graph
    with torch.no_grad():
        teacher_logits = teacher_h @ weight.T  # (T, V), a fixed target
    loss = token_divergence(student_logits, teacher_logits).mean()  # forward KL(T‖S), mean over T
    loss.backward()
    return loss.item()


def ours_step(student_h, teacher_h, weight, chunk, entropy=None):
    def metric(student_logits, positions):  # the training loop's entropy metric, as sd_loss computes
        logp = student_logits.float().log_softmax(-1)  # it: (C, V), freed on return
        entropy[positions] = -(logp.exp() * logp).sum(-1)

    def per_token(student_logits, positions):  # (C, V) → (C,)
        with torch.no_grad():
            teacher_logits = teacher_h[positions] @ weight.T  # (C, V), a fixed target
            if entropy is not None:
                metric(student_logits, positions)
        return token_divergence(student_logits, teacher_logits)

    loss = ChunkedHead.apply(student_h, weight, per_token, chunk).mean()
    loss.backward()
    return loss.item()


def ours_with_entropy_step(student_h, teacher_h, weight, chunk):
    return ours_step(student_h, teacher_h, weight, chunk, entropy=torch.zeros(student_h.shape[0]))


STEPS = {"naive": naive_step, "ours": ours_step, "ours+entropy": ours_with_entropy_step}


def child(args):
    """One run of one variant; writes {seconds, peak_mb, loss} to args.result, the gradient beside it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    weight, student_h, teacher_h = make_inputs(args.V, args.d, args.T)
    small_weight, small_student_h, small_teacher_h = make_inputs(64, 16, 8, seed=1)
    STEPS[args.child](small_student_h, small_teacher_h, small_weight, 4)  # warm-up: one-time set-up
    clean = reset_peak()
    baseline = memory_mb("VmRSS")
    if not clean:  # then the peak may still hold input-building transients; say so
        print(f"warning: cannot reset VmHWM; peak includes {memory_mb('VmHWM') - baseline:.0f} MB "
              "from before the step", file=sys.stderr)
    start = time.perf_counter()
    loss = STEPS[args.child](student_h, teacher_h, weight, args.chunk)
    seconds = time.perf_counter() - start
    peak = memory_mb("VmHWM") - baseline
    torch.save(student_h.grad, args.result + ".grad.pt")
    with open(args.result, "w") as f:
        json.dump({"seconds": seconds, "peak_mb": peak, "loss": loss}, f)


# ---------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--V", type=int, default=151_936, help="vocabulary size (Qwen3: 151936)")
    parser.add_argument("--d", type=int, default=2048, help="hidden size (Qwen3-1.7B: 2048)")
    parser.add_argument("--T", type=int, default=2048, help="response tokens in the row")
    parser.add_argument("--chunk", type=int, default=Config.chunk_size, help="positions per chunk for ours "
                        f"(0: auto, from chunked_head.CHUNK_LOGITS_MB; default: the training default, {Config.chunk_size})")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (median; "
                        "default 3, 1 with --quick)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="V=8192, d=256, T=512, chunk=64, one run each")
    parser.add_argument("--entropy", action="store_true", help="also time ours with the training loop's "
                        "entropy metric (prints entropy_time_ratio = with / without)")
    parser.add_argument("--child", choices=list(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.V, args.d, args.T, args.chunk = 8192, 256, 512, 64
    args.repeats = args.repeats or (1 if args.quick else 3)

    size_mb = args.T * args.V * 4 / 2 ** 20
    print(f"T={args.T} V={args.V} d={args.d} chunk={args.chunk} ({chunk_positions(args.chunk, args.V)} positions), "
          f"float32, threads {args.threads or torch.get_num_threads()}; one (T, V) float32 tensor is {size_mb:.0f} MB, "
          f"the head {args.V * args.d * 4 / 2 ** 20:.0f} MB", flush=True)
    variants = ["naive", "ours"] + (["ours+entropy"] if args.entropy else [])
    runs = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name in variants[r % len(variants):] + variants[:r % len(variants)]:  # rotate the order
                result = os.path.join(tmp, f"{name}-{r}.json")
                command = [sys.executable, os.path.abspath(__file__), "--child", name, "--result", result,
                           "--V", str(args.V), "--d", str(args.d), "--T", str(args.T),
                           "--chunk", str(args.chunk), "--threads", str(args.threads)]
                subprocess.run(command, check=True)
                with open(result) as f:
                    run = json.load(f)
                runs[name].append(run)
                print(f"  run {r + 1}/{args.repeats} {name:12s}: {run['seconds']:.2f} s, "
                      f"peak extra {run['peak_mb']:.0f} MB, loss {run['loss']:.6f}", flush=True)
        grads = {name: torch.load(os.path.join(tmp, f"{name}-0.json.grad.pt")) for name in variants}

    naive_loss, ours_loss = runs["naive"][0]["loss"], runs["ours"][0]["loss"]
    value_diff = abs(ours_loss - naive_loss)
    grad_diff = (grads["ours"] - grads["naive"]).abs().max().item()
    grad_scale = grads["naive"].abs().max().item()
    same_value = value_diff <= 1e-5 * abs(naive_loss)
    same_grad = torch.allclose(grads["ours"], grads["naive"], rtol=1e-4, atol=1e-5 * grad_scale)
    if args.entropy:  # the metric is computed on the side: the loss and gradient must not move
        same_value &= abs(runs["ours+entropy"][0]["loss"] - ours_loss) <= 1e-6 * abs(ours_loss)
        same_grad &= torch.allclose(grads["ours+entropy"], grads["ours"], rtol=1e-6, atol=0)
    print(f"same value (rel 1e-5): {same_value}; same gradient (rtol 1e-4, atol 1e-5·max|grad| = "
          f"{1e-5 * grad_scale:.2g}): {same_grad}")

    peak = {name: max(run["peak_mb"] for run in runs[name]) for name in variants}
    seconds = {name: statistics.median(run["seconds"] for run in runs[name]) for name in variants}
    memory_ratio, time_ratio = peak["ours"] / peak["naive"], seconds["ours"] / seconds["naive"]
    print(f"targets: memory_ratio <= 0.125: {memory_ratio <= 0.125}; time_ratio <= 1.2: {time_ratio <= 1.2}")
    print(f"T={args.T} V={args.V} d={args.d} chunk={args.chunk} chunk_positions={chunk_positions(args.chunk, args.V)} "
          f"repeats={args.repeats} "
          f"naive_peak_mb={peak['naive']:.0f} ours_peak_mb={peak['ours']:.0f} memory_ratio={memory_ratio:.4f} "
          f"naive_s={seconds['naive']:.3f} ours_s={seconds['ours']:.3f} time_ratio={time_ratio:.3f} "
          f"max_abs_value_diff={value_diff:.3g} max_abs_grad_diff={grad_diff:.3g} "
          f"same_value={same_value} same_grad={same_grad}")
    if args.entropy:
        print(f"ours+entropy_s={seconds['ours+entropy']:.3f} "
              f"entropy_time_ratio={seconds['ours+entropy'] / seconds['ours']:.3f}")
    if not (same_value and same_grad):
        sys.exit(1)


if __name__ == "__main__":
    main()
