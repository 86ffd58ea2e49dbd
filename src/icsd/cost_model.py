"""GPU-hours of the paper's COCO recipe per stage: the official scripts against icsd with its levers.

The one cost model of the project. Reads the recipe's sizes and the rates from
``tables/cost_inputs.json`` (each size with where it comes from, each rate marked measured /
derived / estimate / target / assumption, with its source) and, with ``--gpu-results FILE``, the
JSON that ``benchmarks/gpu_all.sh`` writes on a GPU machine: its measured rates replace the icsd
targets and derivations. Prints ``docs/cost.md``:

    python -m icsd.cost_model > docs/cost.md
    python -m icsd.cost_model --gpu-results gpu_all.json > docs/cost.md

``icsd run CONFIG --rehearse`` calls :func:`project` with the sizes it knows of the configured run
(the corpus it counted, the config's epochs); every size it does not know stays the recipe's.
Standard library only.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INPUTS = Path(__file__).resolve().parent / "tables" / "cost_inputs.json"
TARGET_HOURS = 24.0
SIZES = ("captions", "prompts", "images", "pairs_per_image", "epochs", "val_images")


@dataclass
class Line:
    stage: str
    reference_h: float
    icsd_h: float
    reference_basis: str
    icsd_basis: str


def rate(inputs: dict[str, Any], name: str) -> tuple[float, str]:
    r = inputs["rates"][name]
    return float(r["value"]), f"{r['kind']}: {r['source']}"


def apply_gpu_results(inputs: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """Replace icsd figures by those gpu_all.sh measured; the names of the replaced rates."""
    steps: dict[str, Any] = results.get("steps", {})
    replaced: list[str] = []
    if results.get("shapes") != "paper":
        return replaced

    def ok(name: str) -> dict[str, Any] | None:
        step = steps.get(name) or {}
        return step.get("result") if step.get("rc") == 0 else None

    where = "measured by benchmarks/gpu_all.sh"
    if (g := ok("group")) and "fp32" in g.get("runs", {}):
        best = min(r["seconds"] for r in g["runs"].values() if r.get("recall", 0) >= 0.999)
        inputs["rates"]["group_icsd_gpu_s"] = {
            "value": best,
            "kind": "measured",
            "source": f"{where} on {g['device']}",
        }
        replaced.append("group_icsd_gpu_s")
    if (r := ok("render")) and len(r.get("rows", [])) > 1:
        reference, *icsd = r["rows"]  # render_gpu.py: the reference loop first, then icsd per lever set
        best_row = max(icsd, key=lambda x: x["ips"])
        ratio = best_row["ips"] / reference["ips"]
        inputs["rates"]["render_icsd_ratio"] = {"value": round(ratio, 3), "kind": "measured",
                                                "source": f"{where} on {r['device']}: {best_row['path']} "
                                                f"{best_row['ips']:.1f} vs reference {reference['ips']:.1f} images/s"}  # fmt: skip
        replaced.append("render_icsd_ratio")
    if t := ok("train"):
        inputs["rates"]["train_icsd_pairs_per_s"] = {"value": t["icsd"]["samples_per_s"], "kind": "measured",
                                                     "source": f"{where} on {t['device']}, data path included"}  # fmt: skip
        replaced.append("train_icsd_pairs_per_s")
    if tg := ok("train_grouped"):
        inputs["rates"]["train_icsd_grouped_pairs_per_s"] = {"value": tg["icsd"]["samples_per_s"], "kind": "measured",
                                                             "source": f"{where} on {tg['device']}, data path included"}  # fmt: skip
        replaced.append("train_icsd_grouped_pairs_per_s")
    return replaced


def load_inputs(path: Path | None = None) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((path or INPUTS).read_text())
    return data


def sizes(inputs: dict[str, Any]) -> dict[str, float]:
    """The recipe's sizes, ``pairs`` (images x pairs per image) included."""
    n = {k: float(v["value"]) for k, v in inputs["recipe"].items()}
    n["pairs"] = n["images"] * n["pairs_per_image"]
    return n


def lines(inputs: dict[str, Any]) -> list[Line]:
    n = sizes(inputs)
    out: list[Line] = []

    llm, llm_basis = rate(inputs, "llm_prompts_per_s")
    h = n["prompts"] / llm / 3600
    out.append(Line("summarize (LLM, vLLM or an OpenAI-compatible server)", h, h,
                    f"{n['prompts']:,.0f} prompts at {llm:g}/s ({llm_basis}); the official run called gpt-3.5-turbo (API, no GPU)",
                    "the same server: icsd's client is not the bottleneck (BENCHMARKS.md, LLM client)"))  # fmt: skip

    emb, emb_basis = rate(inputs, "embed_captions_per_s")
    h = n["captions"] / emb / 3600
    out.append(
        Line("embed", h, h, f"{n['captions']:,.0f} captions at {emb:,.0f}/s ({emb_basis})", "the same")
    )

    ref_cpu, ref_basis = rate(inputs, "group_reference_cpu_s")
    gpu_s, gpu_basis = rate(inputs, "group_icsd_gpu_s")
    out.append(Line("group (exact top-30)", 0.0, gpu_s / 3600,
                    f"CPU, no GPU: {ref_cpu / 3600:.1f} h on 2 cores ({ref_basis})",
                    f"`icsd group --device cuda`: {gpu_s:g} s ({gpu_basis})"))  # fmt: skip

    ref_r, ref_r_basis = rate(inputs, "render_reference_images_per_s")
    ratio, ratio_basis = rate(inputs, "render_icsd_ratio")
    out.append(Line("render", n["images"] / ref_r / 3600, n["images"] / (ref_r * ratio) / 3600,
                    f"{n['images']:,.0f} images at {ref_r:g}/s ({ref_r_basis})",
                    f"{ref_r * ratio:.1f} images/s = {ratio:.2f}x the reference ({ratio_basis})"))  # fmt: skip

    visits = n["pairs"] * n["epochs"]
    ref_t, ref_t_basis = rate(inputs, "train_reference_pairs_per_s")
    fast, fast_basis = rate(inputs, "train_icsd_pairs_per_s")
    if "train_icsd_grouped_pairs_per_s" in inputs["rates"]:
        grouped, grouped_basis = rate(inputs, "train_icsd_grouped_pairs_per_s")
    else:
        speedup, speedup_basis = rate(inputs, "train_grouped_speedup")
        grouped = fast * speedup
        grouped_basis = (f"derived: {fast:g} pairs/s ({fast_basis}) x {speedup:g} ({speedup_basis})")  # fmt: skip
    out.append(Line("train, ungrouped (`group_captions: false`, the paper's steps)", visits / ref_t / 3600,
                    visits / fast / 3600,
                    f"{n['pairs'] / 1e6:.1f}M pairs x {n['epochs']:.0f} epochs at {ref_t:g} pairs/s ({ref_t_basis})",
                    f"{fast:,.0f} pairs/s ({fast_basis})"))  # fmt: skip
    out.append(
        Line(
            "train, image-grouped (`group_captions: true`, a deviation)",
            visits / ref_t / 3600,
            visits / grouped / 3600,
            "as above",
            f"{grouped:,.0f} pairs/s ({grouped_basis})",
        )
    )

    ref_v, ref_v_basis = rate(inputs, "val_reference_images_per_s")
    icsd_v, icsd_v_basis = rate(inputs, "val_icsd_images_per_s")
    ref_evals = visits / n["reference_global_batch"] / n["reference_eval_every"]
    out.append(Line("validation (beam 3 on the val split)", ref_evals * n["val_images"] / ref_v / 3600,
                    n["icsd_evals"] * n["val_images"] / icsd_v / 3600,
                    f"{ref_evals:,.0f} validations of {n['val_images']:,.0f} images ({inputs['recipe']['reference_global_batch']['source']}) "
                    f"at {ref_v:g} images/s ({ref_v_basis})",
                    f"{n['icsd_evals']:.0f} validations (once per epoch; the paper config keeps every 500 steps) at "
                    f"{icsd_v:g} images/s ({icsd_v_basis})"))  # fmt: skip
    return out


def totals(rows: list[Line], grouped: bool) -> tuple[float, float]:
    train = "image-grouped" if grouped else "ungrouped"
    kept = [r for r in rows if not r.stage.startswith("train") or train in r.stage]
    return sum(r.reference_h for r in kept), sum(r.icsd_h for r in kept)


def fit_sentence(rows: list[Line], inputs: dict[str, Any]) -> str:
    """What image-grouped training would have to reach for the whole recipe to fit the goal."""
    others = sum(r.icsd_h for r in rows if not r.stage.startswith("train"))
    budget = TARGET_HOURS - others
    if budget <= 0:
        return f"The stages other than training alone take {others:.1f} GPU-h."
    n = sizes(inputs)
    visits = n["pairs"] * n["epochs"]
    ref, _ = rate(inputs, "train_reference_pairs_per_s")
    need = visits / (budget * 3600)
    return (
        f"With the other stages at {others:.1f} GPU-h, training must fit in {budget:.1f} GPU-h: "
        f"{need:,.0f} pairs/s, {need / ref:.1f}x the fp32 eager reference."
    )


def recipe_lines(inputs: dict[str, Any]) -> list[str]:
    out = []
    for key in ("captions", "prompts", "images", "pairs_per_image"):
        entry = inputs["recipe"][key]
        out.append(f"- {key.replace('_', ' ')}: {entry['value']:,} ({entry['source']})")
    out.append(f"- pairs: {sizes(inputs)['pairs']:,.0f} (images x pairs per image)")
    for key in ("epochs", "val_images"):
        entry = inputs["recipe"][key]
        out.append(f"- {key.replace('_', ' ')}: {entry['value']:,} ({entry['source']})")
    return out


def project(known: dict[str, tuple[float, str]], inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """GPU-hours at the recipe's sizes with those in ``known`` (``{size: (value, source)}``, keys
    from :data:`SIZES`) replaced: the icsd column, ungrouped training (the paper's steps)."""
    inputs = copy.deepcopy(inputs or load_inputs())
    unknown = set(known) - set(SIZES)
    if unknown:
        raise ValueError(f"unknown recipe sizes {sorted(unknown)}; known: {', '.join(SIZES)}")
    for key, (value, source) in known.items():
        inputs["recipe"][key] = {"value": value, "source": source}
    rows = lines(inputs)
    _, total = totals(rows, grouped=False)
    return {
        "gpu_hours": round(total, 2),
        "sizes": {
            k: {"value": inputs["recipe"][k]["value"], "source": inputs["recipe"][k]["source"]} for k in SIZES
        }
        | {"pairs": {"value": round(sizes(inputs)["pairs"]), "source": "images x pairs per image"}},
        "stages": [{"stage": x.stage, "gpu_hours": round(x.icsd_h, 3), "basis": x.icsd_basis} for x in rows],
    }


def markdown(inputs: dict[str, Any], replaced: list[str]) -> str:
    rows = lines(inputs)
    out = [
        "# Cost: the COCO recipe in GPU-hours",
        "",
        "GPU-hours (one H200 unless a figure says otherwise) of the paper's COCO recipe, per stage, for the",
        "official scripts and for icsd with its levers. Every figure names its basis: *measured* (where,",
        "which command), *derived* (from which measured figures), *estimate* or *assumption* (not measured",
        "by this project), *target* (a performance goal, to be replaced by a measurement).",
        "",
        "Generated by `python -m icsd.cost_model > docs/cost.md` from `src/icsd/tables/cost_inputs.json`;",
        "on a GPU machine `benchmarks/gpu_all.sh gpu_all.json` measures the icsd figures and",
        "`python -m icsd.cost_model --gpu-results gpu_all.json > docs/cost.md` puts them in.",
        "`icsd run CONFIG --rehearse` projects the same model at the sizes of its config.",
        "",
        "Recipe sizes, each with where it comes from:",
        "",
        *recipe_lines(inputs),
        "",
        "| stage | official scripts, GPU-h | icsd, GPU-h | official: basis | icsd: basis |",
        "|---|---:|---:|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.stage} | {r.reference_h:.2f} | {r.icsd_h:.2f} | {r.reference_basis} | {r.icsd_basis} |"
        )
    for grouped in (False, True):
        ref, icsd = totals(rows, grouped)
        label = "image-grouped training" if grouped else "ungrouped training"
        out.append(f"| **total, {label}** | **{ref:.1f}** | **{icsd:.1f}** | | |")
    ref, icsd = totals(rows, True)
    _, icsd_plain = totals(rows, False)
    verdict = "within" if icsd <= TARGET_HOURS else "over"
    ceiling, _ = rate(inputs, "train_grouped_flop_ratio")
    fast, _ = rate(inputs, "train_icsd_pairs_per_s")
    grouped_row = next(r for r in rows if "image-grouped" in r.stage)
    n = sizes(inputs)
    at_ceiling = icsd - grouped_row.icsd_h + n["pairs"] * n["epochs"] / (fast * ceiling) / 3600
    out += [
        "",
        f"**The {TARGET_HOURS:.0f} GPU-hour goal: {verdict}** on these figures ({icsd:.1f} GPU-h with image-grouped "
        f"training, {icsd_plain:.1f} without; the official scripts {ref:.1f}). Were grouped steps as fast as their "
        f"FLOPs ({ceiling:g}x fewer per pair), the total would be {at_ceiling:.1f} GPU-h. "
        + fit_sentence(rows, inputs),
        "",
        "Measured by gpu_all.sh in this table: "
        + (
            ", ".join(f"`{x}`" for x in replaced)
            if replaced
            else "none yet (no GPU has run it; the icsd render, group and grouped-training "
            "figures are targets or derivations)"
        )
        + ".",  # fmt: skip
        "",
        "## Levers (icsd column)",
        "",
        "- render: torch.compile of UNet and VAE, channels_last, fused QKV, JPEG encoding off the GPU's",
        "  thread (`benchmarks/render_gpu.py`); the images equal the reference loop's.",
        "- group: exact top-K by blocked matrix products on the GPU (`icsd group --device cuda`), the same",
        "  candidate sets as faiss flat.",
        "- train: bf16 autocast, fused AdamW, TF32 (the paper config keeps fp32: `train.bf16: true` to use",
        "  them), and image-grouped steps (`train.group_captions: true` with `train.data_order: official`:",
        "  the vision encoder and cross-attention keys/values once per image; a deviation, docs/fidelity.md).",
        "- validation: once per epoch in bf16 (`train.eval_every` = steps per epoch) instead of every 500",
        "  steps in fp32; checkpoint selection becomes coarser, training itself is unchanged.",
        "- summarize: the LLM server's speed decides; icsd's client adds < 1 CPU-second per 1,000 requests.",
        "",
        "## Inputs",
        "",
        "| rate | value | kind | source |",
        "|---|---:|---|---|",
    ]
    for name, r in inputs["rates"].items():
        out.append(f"| `{name}` | {r['value']:,} | {r['kind']} | {r['source']} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=Path, default=INPUTS)
    ap.add_argument("--gpu-results", type=Path, default=None, help="the JSON benchmarks/gpu_all.sh wrote")
    args = ap.parse_args(argv)
    inputs = load_inputs(args.inputs)
    replaced = apply_gpu_results(inputs, json.loads(args.gpu_results.read_text())) if args.gpu_results else []
    text = markdown(inputs, replaced)
    sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()
