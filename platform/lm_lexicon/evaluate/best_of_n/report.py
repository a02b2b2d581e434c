"""The Best-of-N section of the evaluation report (``report.md``): the reward model's training and held-out
accuracy, the language filter, the curves and the per-metric analysis."""
from __future__ import annotations

from typing import Mapping


def render_bon_section(bon: dict) -> str:
    orm = bon["reward_model"]
    return "\n".join([
        "", f"## Best-of-N ({bon['model']})", "",
        f"Outcome reward model{' `' + orm['model'] + '`' if orm.get('model') else ''} "
        f"(`{bon['sampling']['num_return_sequences']}` samples per input, T "
        f"{bon['sampling']['temperature']}, top-k {bon['sampling']['top_k']}, top-p {bon['sampling']['top_p']}): "
        f"trained on {orm.get('train_gold_pairs', orm['train_pairs'])} (gold, sample) pairs"
        f"{_ranked_pairs_note(orm)} from {orm['train_records']} training records{_balance_note(orm)}; "
        f"held-out pairwise accuracy gold vs sample **{orm['valid_accuracy']:.3f}** on {orm['valid_pairs']} pairs "
        f"from {orm['valid_records']} validation records (untrained head: {orm['valid_accuracy_untrained']:.3f}; "
        f"chance: 0.5){_ranked_accuracy_note(orm)}.{_weights_note(orm)}", "",
        *_language_filter_lines(bon.get("language_filter") or {}),
        "Mean Protocol A BLEU of the selected sample among the first N (oracle = an upper bound that reads the "
        "references, not a method):", "", curve_table(bon["curves"]), "", "![BoN curve](bon.png)", "",
        *_analysis_lines(bon.get("analysis") or {})])


def _analysis_lines(analysis: dict) -> list[str]:
    if not analysis.get("metrics") and not analysis.get("pick_length"):
        return []
    skipped = analysis.get("skipped_metrics") or {}
    return ["### Best-of-N on every metric", "",
            "Mean score of the pick among the first N on each evaluated metric with a per-sentence form, computed as "
            "in the table above (the oracle picks by that metric: an upper bound); under each, the paired "
            "permutation p-value of the reward model's picks against sample 1 (same inputs).", "",
            analysis_tables(analysis),
            *([f"Not drawn: {', '.join(f'{m} ({why})' for m, why in skipped.items())}.", ""] if skipped else [])]


def _weights_note(orm: dict) -> str:
    """The retrieval reward model's fitted weights (its "untrained head" is the neighbour agreement alone)."""
    weights = orm.get("weights")
    if not weights:
        return ""
    terms = " + ".join(f"{w:.3g} x {name}" for name, w in weights.items())
    return f" Score = {terms} (before the fit: neighbour_agreement alone)."


def _ranked_pairs_note(orm: dict) -> str:
    if not orm.get("train_sample_pairs"):
        return ""
    stats = orm.get("train_sample_pair_stats") or {}
    dropped = (f"; of their {stats['sample_pairs']} pairs of distinct samples, {stats['ties']} ties and "
               f"{stats['near_ties']} near-ties were dropped" if stats.get("sample_pairs") else "")
    return (f" and {orm['train_sample_pairs']} (better, worse) pairs of samples ranked by Protocol A BLEU (gap >= "
            f"{100 * orm['sample_margin']:.0f} points{dropped})")


def _balance_note(orm: dict) -> str:
    if not orm.get("length_balance"):
        return ""
    return (f" ({orm['train_pairs_dropped_length_balance']} dropped so that the preferred definition is as often the "
            f"shorter as the longer one: {orm['train_pairs']} trained on)")


def _ranked_accuracy_note(orm: dict) -> str:
    if not orm.get("valid_sample_pairs"):
        return ""
    note = (f"; sample vs sample **{orm['valid_accuracy_samples']:.3f}** on {orm['valid_sample_pairs']} held-out "
            f"pairs (untrained head: {orm['valid_accuracy_samples_untrained']:.3f})")
    if "valid_accuracy_length_matched" in orm:  # reports written before the length control have no such keys
        shorter = orm.get("valid_accuracy_samples_shorter_wins")
        note += (f", within length-matched pairs (at most {orm['length_match_gap']} words apart) "
                 f"**{orm['valid_accuracy_length_matched']:.3f}** on {orm['valid_length_matched_pairs']} (untrained "
                 f"head: {orm['valid_accuracy_length_matched_untrained']:.3f})"
                 + (f"; the rule \"prefer the shorter\" scores {shorter:.3f} on all of them" if shorter is not None
                    else ""))
    return note


def _language_filter_lines(lf: dict) -> list[str]:
    if not lf.get("applied"):
        mode = lf.get("mode", "off")
        if not lf:
            return []
        if lf.get("skipped_reason"):
            return [f"Language filter ({mode}): skipped ({lf['skipped_reason']}); the reward model picked among all "
                    "samples.", ""]
        return [f"Language filter: {mode} (no input it applies to)." if mode != "off" else "Language filter: off.",
                ""]
    share = lf.get("compliant_sample_share")
    per = "; ".join(f"{lang}: {r['fallback']} of {r['filtered']}" for lang, r in lf["by_language"].items()
                    if r["filtered"])
    return [f"Language filter ({lf['mode']}): among each input's {lf['n']} samples the reward model picks among "
            f"those in the input's language; **{lf['fallback']} of {lf['filtered']}** filtered inputs had none "
            f"(fallback: all {lf['n']} samples) ({per}). Compliant samples: "
            + (f"{share:.2f}" if share is not None else "-") + " of all. The oracle is not filtered.", ""]


def analysis_tables(analysis: Mapping) -> str:
    """Markdown: per metric, the curves (one row per selection rule, one column per N) and the reward model's
    p-values against sample 1 and against a random pick of its pick's length; then the mean length of the picks."""
    lines: list[str] = []
    for name, res in analysis.get("metrics", {}).items():
        lines += [f"**{name}**", "", curve_table(res["curves"])]
        ns = sorted({int(n) for c in res["curves"].values() for n in c})
        for key, label in (("p_value", "sample 1"), ("p_value_length_control", "a random pick as long")):
            if res.get(key):
                lines.append(f"| p, reward model vs {label} | " + " | ".join(
                    f"{res[key][n]:.3g}" if n in res[key] else "" for n in ns) + " |")
        lines.append("")
    if analysis.get("pick_length"):
        lines += ["**Mean length of the picks** (words; the oracle picks by Protocol A BLEU)", "",
                  curve_table(analysis["pick_length"])]
        p = analysis.get("pick_length_p_value")
        if p:
            ns = sorted({int(n) for c in analysis["pick_length"].values() for n in c})
            lines.append("| p, reward model vs sample 1 | " + " | ".join(
                f"{p[n]:.3g}" if n in p else "" for n in ns) + " |")
        lines.append("")
    return "\n".join(lines)


def curve_table(curves: dict) -> str:
    """Markdown: one row per selection rule, one column per N."""
    ns = sorted({int(n) for c in curves.values() for n in c})
    lines = ["| selection | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns)]
    for label, c in curves.items():
        lines.append(f"| {label} | " + " | ".join(f"{c[n]:.2f}" if n in c else "" for n in ns) + " |")
    return "\n".join(lines)
