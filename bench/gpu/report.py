"""``summary.txt`` of the GPU suite: one line per part, then each part's figures, then the
estimate-vs-peak table gathered from every part that ran a job shape."""

from __future__ import annotations

from typing import Any


def summary_text(meta: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    card = meta.get("card", {})
    mode = "DRY RUN (CPU, tiny models, declared card)" if meta["dry_run"] else "real card"
    lines = [f"# lora-farm GPU suite, {meta['date']}, {mode}",
             f"# card: {card.get('name')} {card.get('uuid')} {card.get('total_mb')} MiB "
             f"({card.get('source')}); torch {meta.get('torch')} CUDA {meta.get('cuda')}; "
             f"python {meta['python']}; {meta['seconds']} s in all",
             "# command: bench/gpu_suite.sh" + (" --dry-run" if meta["dry_run"] else ""), "",
             f"{'part':<10} {'status':<13} {'seconds':>8}"]
    for part, result in results.items():
        lines.append(f"{part:<10} {status_of(result):<13} {result.get('seconds', 0):>8}")
    for part, result in results.items():
        lines += ["", f"## {part}"] + _details(part, result)
    lines += ["", "## estimate vs measured peak (peak: torch max_memory_reserved, no CUDA context)"]
    lines += estimate_table(results)
    return "\n".join(lines) + "\n"


def status_of(result: dict[str, Any]) -> str:
    if "error" in result:
        return "ERROR"
    if "skipped" in result:
        return "skipped"
    return "ok" if result.get("ok", True) else "CHECK FAILED"


def _details(part: str, result: dict[str, Any]) -> list[str]:
    if "error" in result:
        return [f"error: {result['error']}"] + [f"  | {line}" for line in result.get("log_tail", [])]
    if "skipped" in result:
        return [f"skipped: {result['skipped']}"]
    shown = _FORMATTERS.get(part)
    return shown(result) if shown else [f"{k}: {v}" for k, v in result.items() if k != "shapes"]


def _inventory(r: dict[str, Any]) -> list[str]:
    lines = [f"farm cards: {[(c['uuid'], c['name'], c['total_mb']) for c in r['farm_cards']]}",
             f"nvidia-smi -L uuids: {r['nvidia_smi_uuids']} -> match: {r['inventory_matches']}"]
    lines += [f"pinned to {p['card']}: sees {p['device_count']} device(s), uuid {p['uuid']}, "
              f"CUDA_VISIBLE_DEVICES={p['cuda_visible_devices']}" for p in r["pinning"]]
    return lines + [f"pinning ok: {r['pinning_ok']}"]


def _run_line(label: str, run: dict[str, Any]) -> str:
    return (f"{label:<6} {run.get('precision', '')} {run['it_s']} it/s ({run['s_per_step']} s/step), "
            f"peak {run['peak_vram_mb']} MiB, trainable {_trainable(run)}, "
            f"final loss {run.get('final_loss')}")


def _trainable(run: dict[str, Any]) -> Any:
    return run.get("trainable_params") or run.get("trainable_parameters")


def _unet(r: dict[str, Any]) -> list[str]:
    return [_run_line("farm", r["farm"]), _run_line("plain", r["plain"]),
            f"farm it/s / plain it/s: {r['farm_over_plain_it_s']}"]


def _precision(r: dict[str, Any]) -> list[str]:
    return [_run_line(name, r[name]) + f", loss finite: {r[name]['loss_finite']}"
            for name in ("fp16", "bf16")]


def _packing(r: dict[str, Any]) -> list[str]:
    packed, serial = r["packed"], r["serial"]
    return [f"K = {r['jobs']} jobs on one card at once: makespan {packed['makespan_s']} s, "
            f"states {packed['states']}, attempts {packed['attempts']}",
            f"one after another: makespan {serial['makespan_s']} s, states {serial['states']}",
            f"makespan ratio (serial / packed): {r['serial_over_packed_makespan']}",
            f"sum of peaks {r['sum_of_peaks_mb']} MiB of the card's {r['card_mb']} MiB "
            f"(peaks {packed['peaks_mb']})",
            f"out-of-memory ends: packed {packed['oom_ends']}, serial {serial['oom_ends']}"]


def _oom(r: dict[str, Any]) -> list[str]:
    return [f"state {r['state']} after {r['attempts']} attempts; {r['oom_ends']} out-of-memory "
            f"end(s) under a {r['vram_cap_mb']:.0f} MiB cap; final plan {r['final_plan']}",
            f"first OOM: {r['first_oom']}", f"peak of the last attempt: {r['peak_vram_mb']} MiB"] + [
            f"trainer: {line}" for line in r["cap_lines"]]


def _flux(r: dict[str, Any]) -> list[str]:
    return [_run_line(mode, r[mode]) for mode in ("none", "fp8", "nf4")] + [
        f"peak saved against none (MiB): {r['saved_mb']}"]


_FORMATTERS = {"inventory": _inventory, "unet": _unet, "precision": _precision,
               "packing": _packing, "oom": _oom, "flux": _flux}


def estimate_table(results: dict[str, dict[str, Any]]) -> list[str]:
    rows = [row for result in results.values() for row in result.get("shapes", [])]
    if not rows:
        return ["(no job shape ran)"]
    lines = [f"{'shape':<52} {'estimate MiB':>13} {'peak MiB':>10} {'peak/estimate':>14}"]
    for row in rows:
        est, peak = row["estimate_mb"], row["peak_mb"]
        ratio = f"{peak / est:.2f}" if est and peak else "-"
        lines.append(f"{row['shape']:<52} {est if est is not None else '-':>13} "
                     f"{peak if peak is not None else '-':>10} {ratio:>14}")
    return lines
