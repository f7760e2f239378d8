"""The suite's report: its records gathered by part, the targets checked, and a Markdown table for the README."""

from __future__ import annotations

from typing import Any

# The targets: (what, record kind, selector, field, threshold, "min" or "max").
TARGETS = [
    ("sampling b16: fast vs diffusers' best documented mode", "sampling_comparison", {"batch": 16},
     "fast_speedup", 2.0, "min"),
    ("sampling b256: fast vs diffusers' best documented mode", "sampling_comparison", {"batch": 256},
     "fast_speedup", 2.0, "min"),
    ("sampling b256: ddpm_hf fast MFU", "sampling", {"batch": 256, "contender": "ddpm_hf-best"}, "mfu", 0.40, "min"),
    ("training b256 bf16: vs the diffusers-style step", "training", {"batch": 256, "mode": "bf16"}, "speedup", 1.5,
     "min"),
    ("fp32 images vs diffusers on CUDA, b16 (max abs diff per pixel)", "sampling_comparison", {"batch": 16},
     "fp32_max_abs_diff", 1e-4, "max"),
    ("fp32 images vs diffusers on CUDA, b256 (max abs diff per pixel)", "sampling_comparison", {"batch": 256},
     "fp32_max_abs_diff", 1e-4, "max"),
]


def summarise(suite: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the suite found, as one JSON-able dict."""
    environment = next((r for r in records if r["kind"] == "environment"), {})
    targets = []
    for what, kind, selector, field, threshold, sense in TARGETS:
        record = next((r for r in records if r["kind"] == kind and all(r.get(k) == v for k, v in selector.items())),
                      None)
        value = record.get(field) if record else None
        met = None if value is None else (value >= threshold if sense == "min" else value <= threshold)
        targets.append({"target": what, "threshold": threshold, "sense": sense, "value": value, "met": met})
    return {
        "suite": suite,
        "environment": {k: v for k, v in environment.items() if k not in ("part", "kind")},
        "targets": targets,
        "records": records,
        "skipped": [r for r in records if r["kind"] == "skipped"],
        "errors": [r for r in records if r["kind"] == "error"],
    }


def render_markdown(summary: dict[str, Any]) -> str:
    suite, env, records = summary["suite"], summary["environment"], summary["records"]
    by_kind = lambda kind: [r for r in records if r["kind"] == kind]  # noqa: E731
    machine = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('threads')} threads)"
    lines = [f"### GPU suite: {machine}{' (smoke run: tiny configs, not the measurements)' if suite['smoke'] else ''}",
             "",
             f"{suite['date']}; driver {env.get('driver')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN "
             f"{env.get('cudnn')}, diffusers {env.get('diffusers')}, accelerate {env.get('accelerate')}, Python "
             f"{env.get('python')}; ddpm_hf {env.get('ddpm_hf_commit') or 'source ' + str(env.get('ddpm_hf_source_sha256'))}. "
             f"Measured bf16 matmul ({env.get('matmul_size')}^3): {_fmt(env.get('bf16_matmul_tflops'))} TFLOP/s, "
             f"the denominator of MFU. Suite wall time {suite['wall_s']} s of a {suite['budget_s']} s budget.",
             ""]
    lines += ["| target | measured | threshold | met |", "|---|---|---|---|"]
    for target in summary["targets"]:
        met = {True: "**yes**", False: "no", None: "not measured"}[target["met"]]
        sign = ">=" if target["sense"] == "min" else "<="
        lines.append(f"| {target['target']} | {_fmt(target['value'])} | {sign} {target['threshold']:g} | {met} |")

    summary_rows = by_kind("tests_summary")
    if summary_rows:
        tests = summary_rows[-1]
        lines += ["", f"Correctness (`pytest -m cuda`): {tests['passed']} passed, {tests['failed']} failed, "
                      f"{tests['error']} errors, {tests['skipped']} skipped."]
        lines += [f"- {r['outcome']}: `{r['name']}`: {r['message']}" for r in by_kind("test")
                  if r["outcome"] in ("failed", "error")]

    sampling = by_kind("sampling")
    if sampling:
        lines += ["", "| sampling | batch | img/s (1000 steps) | MFU | peak MiB | warm-up s | vs diffusers |",
                  "|---|---|---|---|---|---|---|"]
        comparisons = {r["batch"]: r for r in by_kind("sampling_comparison")}
        for r in sampling:
            comparison = comparisons.get(r["batch"], {})
            ratio = {"ddpm_hf-best": comparison.get("fast_speedup"),
                     "ddpm_hf-fp32-eager": comparison.get("plain_speedup")}.get(r["contender"])
            note = " (cudagraphs skipped)" if r.get("cudagraph_skips") else ""
            lines.append(f"| {CONTENDERS.get(r['contender'], r['contender'])}{note} | {r['batch']} | "
                         f"{_fmt(r['images_per_s_1000_steps'])} | {_pct(r['mfu'])} | {_fmt(r['peak_mib'])} | "
                         f"{_fmt(r['compile_s'])} | {_fmt(ratio, 'x')} |")
        steps = {r["batch"]: r["steps_timed"] for r in sampling}
        lines.append("\nDenoising steps per timed call: " + ", ".join(f"{s} at batch {b}" for b, s in steps.items())
                     + " (images/s scaled to 1,000 steps). Plain pipelines at PyTorch's defaults (TF32 convolutions). "
                     "Max abs diff per pixel of ddpm_hf's and diffusers' plain images in float32 proper: " + ", ".join(
                         f"b{b} {_fmt(c.get('fp32_max_abs_diff'))}" for b, c in comparisons.items()) + ".")

    training = by_kind("training")
    if training:
        lines += ["", "| training step | batch | ddpm_hf img/s | diffusers-style img/s | speedup | ddpm_hf MFU | "
                      "diffusers MFU |", "|---|---|---|---|---|---|---|"]
        for r in training:
            lines.append(f"| {r['mode']} | {r['batch']} | {_fmt(r['ddpm_hf_images_per_s'])} | "
                         f"{_fmt(r['diffusers_images_per_s'])} | {_fmt(r['speedup'], 'x')} | {_pct(r['ddpm_hf_mfu'])} "
                         f"| {_pct(r['diffusers_mfu'])} |")

    for r in by_kind("real_run"):
        lines += ["", f"Real run (`examples/train.py --mixed_precision bf16`): {'**ok**' if r['ok'] else 'FAILED'}: "
                      f"stopped by SIGTERM at step {r.get('stopped_at')} (exit {r.get('stopped_run_exit_code')}), "
                      f"resumed to {r.get('steps')} (exit {r.get('resumed_run_exit_code')}), loss "
                      f"{_fmt(r.get('first_loss'))} -> {_fmt(r.get('last_loss'))}, `ddpm-hf sample` exit "
                      f"{r.get('cli_sample_exit_code')}, loads in diffusers: {r.get('loads_in_diffusers')}."]

    problems = [f"- {p}: {o['status']} ({o['message']})" for p, o in suite["parts"].items() if o["status"] != "ok"]
    problems += [f"- error in {r['part']}, {r['what']}: {r['error']}" for r in summary["errors"]]
    problems += [f"- skipped in {r['part']}: {r['what']}: {r['reason']}" for r in summary["skipped"]]
    if problems:
        lines += ["", "Not measured:"] + problems
    return "\n".join(lines) + "\n"


CONTENDERS = {
    "ddpm_hf-fp32-eager": "ddpm_hf plain (fp32)",
    "ddpm_hf-best": "ddpm_hf `enable_fast_sampling()`",
    "diffusers-fp32-eager": "diffusers eager (fp32)",
    "diffusers-best": "diffusers fp16 + channels_last + compile(reduce-overhead)",
    "diffusers-max-autotune": "diffusers fp16 + channels_last + compile(max-autotune)",
}


def _fmt(value: Any, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        text = f"{value:.2e}" if 0 < abs(value) < 1e-2 else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return text + suffix
    return f"{value}{suffix}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
