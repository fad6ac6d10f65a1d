"""The claims and stage 06's tables as a reader sees them: ``claims.md``, the paper's tables
(Markdown and booktabs LaTeX, with their captions) and the macros of ``numbers.tex``.

>>> macro_name("std_gap", "run")
'StdGapRun'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pandas as pd

from mislib.provenance import Provenance, caption
from mislib.vocabulary import ARMS, decoded_model, is_missing
from mislib.vocabulary import CLAIM_STATUSES as STATUSES

TABLES = ("claims", "accuracy_by_model_arm", "accuracy_by_factor", "semsam_effect",
          "unparseable", "factor_effects")

# ----------------------------------------------------------------------------------------
# Writing tables, macros and claims.md
# ----------------------------------------------------------------------------------------

def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown pipe table of ``table`` (cells as given, ``|`` escaped)."""
    def cell(v: Any) -> str:
        return "" if is_missing(v) else \
            str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(cell(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |"
            for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


_LATEX_SPECIAL = re.compile(r"([&%$#_{}])")


def latex_escape(text: Any) -> str:
    """Escape LaTeX's special characters in a table cell."""
    s = "" if is_missing(text) else str(text)
    s = s.replace("\\", r"\textbackslash{}")
    s = _LATEX_SPECIAL.sub(r"\\\1", s)
    return s.replace("~", r"\textasciitilde{}").replace("^", r"\textasciicircum{}") \
        .replace("−", "$-$").replace("×", r"$\times$").replace("→", r"$\to$") \
        .replace("±", r"$\pm$").replace("·", r"$\cdot$").replace("…", r"\ldots{}")


def latex_table(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs ``table`` environment (via pandas' Styler) of already-formatted cells.

    The tabular is shrunk to the text width when wider (``\\resizebox`` of graphicx, which
    the document loads).
    """
    escaped = table.map(latex_escape)
    escaped.columns = [latex_escape(c) for c in table.columns]
    align = "".join("r" if pd.api.types.is_numeric_dtype(table[c]) else "l"
                    for c in table.columns)
    body = escaped.style.hide(axis="index").to_latex(
        hrules=True, column_format=align, caption=latex_escape(caption),
        label=f"tab:{label}", position="htbp", position_float="centering")
    # shrink a table wider than the text to the text width (graphicx's \resizebox)
    fit = r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%"
    body = body.replace("\\begin{tabular}", fit + "\n\\begin{tabular}", 1)
    body = body.replace("\\end{tabular}\n", "\\end{tabular}}\n", 1)
    return body.replace("\\centering\n", "\\centering\n\\small\n", 1)


def _pct(v: float, digits: int = 1) -> str:
    return "" if is_missing(v) else f"{v:.{digits}f}"


def _paper(v: float) -> str:
    """The paper's number as the paper prints it (up to two decimals, no trailing zeros)."""
    return "" if is_missing(v) else f"{v:.2f}".rstrip("0").rstrip(".")


def _interval(lo: float, hi: float, digits: int = 1) -> str:
    if any(is_missing(v) for v in (lo, hi)):
        return ""
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def _n(n_questions: Any, n_trials: Any) -> str:
    """``questions × trials`` (empty when nothing was measured)."""
    if is_missing(n_questions) or not int(n_questions):
        return ""
    return f"{int(n_questions):,} × {int(n_trials)}"


def _claim_n(kind: str, n_questions: Any, n_trials: Any, minus_n_questions: Any,
             minus_n_trials: Any) -> str:
    """A claim's n: ``questions × trials``, for a difference per side (``a vs b``, or ``each
    side`` when both sides have the same counts, as the paired SemSam comparisons do).

    >>> _claim_n("difference", 640, 4, 410, 2)
    '640 × 4 vs 410 × 2'
    >>> _claim_n("difference", 96, 2, 96, 2)
    '96 × 2 each side'
    """
    first = _n(n_questions, n_trials)
    if kind != "difference" or not first or is_missing(minus_n_questions) \
            or not int(minus_n_questions):
        return first
    second = _n(minus_n_questions, minus_n_trials)
    return f"{first} each side" if first == second else f"{first} vs {second}"


def _paper_band(paper: float, sign: int, tolerance: float) -> str:
    if is_missing(paper):
        return {1: "> 0", -1: "< 0"}.get(int(sign), "—")
    return f"{_paper(paper)} ± {tolerance:g}"


def _factor_cell(estimate: float, lo: float, hi: float, converged: Any) -> str:
    """Stage 07's estimate, or *not converged* instead of a number a reader should not use."""
    if is_missing(estimate):
        return ""
    if converged is False:
        return "not converged"
    text = f"{estimate:.1f} {_interval(lo, hi)}"
    return text if converged is True else f"{text} (convergence unknown)"


def _short_model(models: str) -> str:
    return "pooled" if "(pooled)" in models else models


def claims_display(claims: pd.DataFrame) -> pd.DataFrame:
    """The claims table as printed (strings): paper ± tolerance, this run, raw, chance, n."""
    return pd.DataFrame({
        "quantity": claims["quantity"], "model": [_short_model(m) for m in claims["models"]],
        "paper": [_paper_band(p, s, t) for p, s, t in
                  zip(claims["paper"], claims["sign"], claims["tolerance"], strict=True)],
        "this run": [f"{_pct(e)} {_interval(lo, hi)}".strip() for e, lo, hi in
                     zip(claims["estimate"], claims["lo"], claims["hi"], strict=True)],
        "raw": [_pct(v) for v in claims["raw"]],
        "chance": [_pct(v) for v in claims["chance"]],
        "n": [_claim_n(*row) for row in zip(
            claims["kind"], claims["n_questions"], claims["n_trials"],
            claims["minus_n_questions"], claims["minus_n_trials"], strict=True)],
        "factor model": [_factor_cell(e, lo, hi, c) for e, lo, hi, c in zip(
            claims["factor_estimate"], claims["factor_lo"], claims["factor_hi"],
            claims["factor_converged"], strict=True)],
        "status": claims["status"]})


def _chance_column(table: pd.DataFrame) -> list[str]:
    """A stage-06 table's ``chance`` (fraction) as percent strings (empty when absent)."""
    if "chance" not in table:
        return [""] * len(table)
    return [_pct(100 * v) for v in table["chance"]]


def format_tables(tables: Mapping[str, pd.DataFrame], claims: pd.DataFrame,
                  level: float = 0.95, converged: bool | None = None
                  ) -> dict[str, tuple[pd.DataFrame, str]]:
    """The paper's tables, formatted for print: ``{name: (table, caption)}``.

    Every accuracy stands with its raw value, chance (1 / options) and n (questions ×
    trials) beside Bayes@N; the caption says what is shown (the caller adds the provenance).
    """
    pct_level = f"{100 * level:g} %"
    out: dict[str, tuple[pd.DataFrame, str]] = {}
    out["claims"] = (claims_display(claims),
                     "The paper's headline numbers (± the reproduction test's tolerance) "
                     f"beside this run: Bayes@N with {pct_level} credible interval, raw "
                     "accuracy, chance and n = questions × trials (percent or points; a "
                     "difference gives each side's; with models pooled, a question counts once "
                     "per model).")

    by = tables["bayes_by_factor"]
    overall = by[by["factor"] == "all"]
    out["accuracy_by_model_arm"] = (pd.DataFrame({
        "model": overall["model"], "arm": overall["arm"],
        "n": [_n(q, t) for q, t in zip(overall["n_questions"], overall["n_trials"],
                                       strict=True)],
        "chance": _chance_column(overall),
        "raw": [_pct(100 * v) for v in overall["accuracy"]],
        "Bayes@N": [_pct(100 * v) for v in overall["mu"]],
        "interval": [_interval(100 * lo, 100 * hi) for lo, hi in
                     zip(overall["lo"], overall["hi"], strict=True)]}),
        f"Accuracy (%) per model and decoding arm: raw, Bayes@N with {pct_level} credible "
        "interval, chance and n = questions × trials.")

    factors = tables["bayes_by_factor_pooled"]
    wide = []
    for (factor, lv), g in factors.groupby(["factor", "level"], sort=False):
        row = {"factor": factor, "level": lv,
               "chance": " / ".join(dict.fromkeys(_chance_column(g))),
               "n": " / ".join(dict.fromkeys(_n(q, t) for q, t in
                                             zip(g["n_questions"], g["n_trials"],
                                                 strict=True)))}
        for r in g.itertuples():
            row[f"{r.arm} raw"] = _pct(100 * r.accuracy)
            row[f"{r.arm} Bayes@N"] = f"{100 * r.mu:.1f} {_interval(100 * r.lo, 100 * r.hi)}"
        wide.append(row)
    out["accuracy_by_factor"] = (pd.DataFrame(wide).fillna(""),
                                 "Accuracy (%) per factor level and arm, models pooled: raw "
                                 f"and Bayes@N with {pct_level} credible interval; chance and "
                                 "n = questions × trials (per arm when they differ; a "
                                 "question counts once per model).")

    eff = tables["semsam_effect"]
    out["semsam_effect"] = (pd.DataFrame({
        "model": [decoded_model(m, d) for m, d in
                  zip(eff["model"], eff.get("decoder", pd.Series("local", index=eff.index)),
                      strict=True)],
        "n": [_n(q, t) for q, t in zip(eff["n_questions"], eff["n_trials"], strict=True)],
        "chance": _chance_column(eff),
        "baseline raw": [_pct(100 * v) for v in eff["baseline_accuracy"]],
        "baseline": [_pct(100 * v) for v in eff["baseline_mu"]],
        "SemSam raw": [_pct(100 * v) for v in eff["semsam_accuracy"]],
        "SemSam": [_pct(100 * v) for v in eff["semsam_mu"]],
        "effect": [_pct(100 * v) for v in eff["effect_mu"]],
        "interval": [_interval(100 * lo, 100 * hi) for lo, hi in
                     zip(eff["effect_lo"], eff["effect_hi"], strict=True)],
        "fixed": eff["n_fixed"], "broken": eff["n_broken"]}),
        "SemSam against baseline decoding on the same questions and trials: raw and Bayes@N "
        f"accuracy (%), the Bayes@N effect (points, {pct_level} credible interval), chance, "
        "n = questions × trials, and trials fixed and broken.")

    un = tables["unparseable"]
    out["unparseable"] = (pd.DataFrame({
        "model": un["model"], "arm": un["arm"], "answers": un["n_responses"],
        "unparseable": [_pct(100 * v) for v in un["unparseable_rate"]],
        "ambiguous": [_pct(100 * v) for v in un["ambiguous_rate"]],
        "not answered": un["n_not_answered"] if "n_not_answered" in un else 0}),
        "Answers the parser could not read or found contradictory (% of answers; scored as "
        "wrong), and records without an answer (missing input, out of memory; not scored), "
        "per model and arm.")

    fe = tables.get("factor_effects")
    if fe is not None and not fe.empty:
        fit = {True: "The fit converged.", None: "The fit's convergence is unknown (no "
               "diagnostics).", False: "NOT CONVERGED: R-hat, ESS or divergences fail; do "
               "not read these effects."}[converged]
        out["factor_effects"] = (pd.DataFrame({
            "term": fe["term"], "mean": [f"{v:.2f}" for v in fe["mean"]],
            "interval": [f"[{lo:.2f}, {hi:.2f}]" for lo, hi in
                         zip(fe["lo95"], fe["hi95"], strict=True)],
            "R-hat": [f"{v:.3f}" for v in fe["r_hat"]],
            "ESS": [f"{v:.0f}" for v in fe["ess_bulk"]]}),
            "Factor model: fixed effects on the logit scale (sum-to-zero deviations), "
            f"95 % intervals, R-hat and bulk ESS. {fit}")
    return out


def macro_name(*parts: str) -> str:
    """A LaTeX macro name from words (letters only): ``("std_gap", "run")`` → ``StdGapRun``."""
    words = re.split(r"[^A-Za-z0-9]+", " ".join(parts))
    digits = {str(i): w for i, w in enumerate(
        ("Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine"))}
    name = "".join(w[:1].upper() + w[1:] for w in words if w)
    return "".join(digits.get(ch, ch) for ch in name)


def _count(n: int) -> str:
    """An integer for LaTeX with a thin-space-free thousands comma (``1{,}128``)."""
    return f"{int(n):,}".replace(",", "{,}")


def _headline_rows(claims: pd.DataFrame, semsam_model: str) -> pd.DataFrame:
    """One row per claim id: the paper's model's row where several models ran, else the first."""
    picked = []
    for _, g in claims.groupby("id", sort=False):
        mine = g[g["models"].str.lower().str.contains(semsam_model.lower(), regex=False)]
        picked.append((mine if len(mine) else g).iloc[0])
    return pd.DataFrame(picked)


def numbers_tex(claims: pd.DataFrame, tables: Mapping[str, pd.DataFrame], prov: Provenance,
                prefix: str = "mis", semsam_model: str = "Qwen3-VL-32B",
                recovery: Mapping[str, Any] | None = None) -> str:
    """``\\newcommand`` macros: the profile and counts, the demo switch, the headline numbers.

    ``\\ifmisdemo`` is true when a smoke model (random weights) answered, so that
    ``main.tex`` can say that it is the demo; ``\\ifmissimulated`` when the responses were
    simulated; ``\\ifmisconverged`` when stage 07's fit converged. ``recovery``
    (:func:`read_recovery`) gives the recovery study's coverage (``n/a`` without one),
    ``\\ifmisrecovery`` and ``\\ifmisrecoveryconverged``, and its calibration test's
    ``\\misRecoveryCalibrationP`` (``= 0.62`` or ``< 0.001``, for ``$p ...$``),
    ``\\ifmisrecoverycalibrated`` and
    ``\\ifmisrecoveryunbiased``.
    """
    lines = ["% Generated by mislib.claims (notebook 08_paper_assets); do not edit.",
             f"% {caption(prov)}",
             "% Percent (levels) or percentage points (differences)."]

    def add(name: str, value: str) -> None:
        lines.append(f"\\newcommand{{\\{prefix}{name}}}{{{value}}}")

    rec = recovery or {}
    cal = rec.get("calibration") or {}
    for flag, value in (("demo", prov.smoke), ("simulated", prov.simulated),
                        ("converged", prov.converged is True), ("recovery", bool(rec)),
                        ("recoveryconverged", rec.get("converged") is True),
                        ("recoverycalibrated", bool(cal)),
                        ("recoveryunbiased", cal.get("unbiased") is True)):
        lines += [f"\\newif\\if{prefix}{flag}", f"\\{prefix}{flag}{'true' if value else 'false'}"]
    add("Profile", latex_escape(prov.profile))
    add("Models", latex_escape(", ".join(prov.models)))
    add("RunIds", latex_escape(", ".join(prov.run_ids)))
    add("Provenance", latex_escape(prov.label()))
    add("NQuestionsGenerated", _count(prov.n_questions_generated))
    add("NQuestionsAsked", _count(prov.n_questions_asked))
    add("NQuestionsAnswered", _count(prov.n_questions_asked if prov.n_questions_answered is None
                                     else prov.n_questions_answered))
    add("NTrials", prov.trials_text(dash="--"))
    add("NModels", str(len(prov.models)))
    add("NResponses", _count(len(tables["scored"])))
    add("Tolerance", f"{float(claims['tolerance'].iat[0]):g}" if len(claims) else "")
    add("RecoveryCovered", str(rec["covered"]) if rec else "n/a")
    add("RecoveryTerms", str(rec["terms"]) if rec else "n/a")
    add("RecoveryCoverage", _pct(100 * rec["coverage"], 0) if rec else "n/a")
    # relation and value, for math mode: "= 0.62", "< 0.001"
    add("RecoveryCalibrationP", "n/a" if not cal else "< 0.001" if cal["p_value"] < 0.001
        else f"= {cal['p_value']:.2g}")
    counts = claims["status"].value_counts()
    for status in STATUSES:
        add("N" + macro_name(status), str(int(counts.get(status, 0))))
    for r in _headline_rows(claims, semsam_model).itertuples():
        base = macro_name(r.id)
        add(base + "Paper", _paper(r.paper) or "n/a")
        add(base + "Model", latex_escape(_short_model(r.models)) or "n/a")
        add(base + "Run", _pct(r.estimate) or "n/a")
        add(base + "RunCI", _interval(r.lo, r.hi) or "n/a")
        add(base + "Raw", _pct(r.raw) or "n/a")
        add(base + "Chance", _pct(r.chance) or "n/a")
        add(base + "N", latex_escape(_claim_n(r.kind, r.n_questions, r.n_trials,
                                              r.minus_n_questions, r.minus_n_trials))
            or "n/a")
        add(base + "Status", r.status)
    by = tables["bayes_by_factor_pooled"]
    overall = by[by["factor"] == "all"].set_index("arm")
    for arm in ARMS:
        r = overall.loc[arm] if arm in overall.index else None
        add("Acc" + macro_name(arm), "n/a" if r is None else _pct(100 * r["mu"]))
        add("Acc" + macro_name(arm) + "CI",
            "n/a" if r is None else _interval(100 * r["lo"], 100 * r["hi"]))
        add("Raw" + macro_name(arm), "n/a" if r is None else _pct(100 * r["accuracy"]))
        add("Chance" + macro_name(arm),
            "n/a" if r is None or "chance" not in r else _pct(100 * r["chance"]) or "n/a")
    return "\n".join(lines) + "\n"


BAYES_AT_N = (
    "**Bayes@N.** Each question was asked N times. Bayes@N puts a uniform Beta(1, 1) prior "
    "on a question's accuracy and updates it with its N trials: k correct answers give the "
    "posterior mean (k + 1) / (N + 2). `this run` is the average of these means over the "
    "questions, with scorio's normal-approximation credible interval. The data's weight is "
    "N / (N + 2), the prior's (a pull towards 50 %) 2 / (N + 2): with N = 2 a question "
    "answered wrongly both times counts 25 % and one answered rightly both times 75 %, so a "
    "model that is always wrong scores 25 %, not 0 %. `raw` is the plain share of correct "
    "trials and `chance` the accuracy of guessing (the mean of 1 / number of answer "
    "options); `n` is questions × trials (each side's for a difference; where models are "
    "pooled a question counts once per model that answered it). If a paper number "
    "is a plain accuracy, Bayes@N pulls this run's value towards 50 % by the same factor (N = 5: a 13-point difference "
    "shows as 9.3 points).")


def _recovery_sentence(recovery: Mapping[str, Any] | None) -> str:
    if not recovery:
        return " No recovery study was run: nothing shows that the factor model finds effects."
    fit = {True: "", False: " (its fit did not converge)", None: ""}[recovery["converged"]]
    cal = recovery.get("calibration")
    verdict = "" if not cal else (
        f" Taken together the planted effects lie where the fit puts them (calibration test "
        f"p = {cal['p_value']:.2g}): no sign of bias." if cal["unbiased"] else
        f" Taken together the planted effects lie further from the fit than chance allows "
        f"(calibration test p = {cal['p_value']:.1g}): the recovery is BIASED.")
    return (f" In stage 07's recovery study (simulated effects shaped like the paper's), the "
            f"factor model's 95 % intervals covered {recovery['covered']} of "
            f"{recovery['terms']} planted effects ({100 * recovery['coverage']:.0f} %){fit}."
            + verdict)


def claims_markdown(claims: pd.DataFrame, context: Mapping[str, Any]) -> str:
    """``paper/claims.md``: the provenance, the rules, Bayes@N, then one section per claim."""
    prov: Provenance = context["provenance"]
    tol = context.get("tolerance", 5.0)
    lines = ["# Headline claims of the paper beside this run", "",
             f"{caption(prov)} Claims arm `{context.get('arm')}` (models pooled) for the "
             f"factor claims; {100 * context.get('level', 0.95):g} % credible intervals.", ""]
    if prov.smoke:
        lines += ["> **The demo's smoke model has random weights: its answers are noise. "
                  "These numbers test the pipeline, not the paper; no claim is assessed.**",
                  ""]
    if prov.simulated:
        lines += ["> **Simulated responses (mislib.simulate): these numbers test the pipeline "
                  "only.**", ""]
    if prov.converged is False:
        lines += ["> **Stage 07's factor model did not converge (R-hat, ESS or divergences): "
                  "its column says *not converged*.**", ""]
    elif prov.converged is None:
        lines += ["> Stage 07's diagnostics are missing: the factor model's convergence is "
                  "unknown.", ""]
    lines += [
        f"**The reproduction test** (tolerance ± {tol:g} percent or points, "
        f"`[paper] tolerance_points`). A level is *reproduced* when this run's interval lies "
        "inside the paper's value ± the tolerance, *contradicted* when it lies entirely "
        "outside that band, *inconclusive* otherwise (wider than the band or across its "
        "edge). A difference is *reproduced* only when its interval also excludes 0 on the "
        "side of the paper's sign; it is *contradicted* when it lies outside the band or "
        "excludes 0 on the other side. Where the paper gives a direction but no number "
        "(`> 0`), only the side of 0 is tested. A claim is *not assessed* when the smoke "
        "model answered it, when it rests on fewer than "
        f"{context.get('min_questions', 30)} questions (`[paper] min_questions`), or when "
        "the paper's number is another model's; *not measurable* when this run has no such "
        "questions or arms. The SemSam claims are evaluated for every model that ran both "
        "arms; the paper's numbers are its model's (`paper model`).", "",
        BAYES_AT_N, "",
        "`factor model` is stage 07's population-averaged estimate of the same contrast "
        "where it has one (it pools both arms and every ablation, so its scope is wider); "
        "it reads *not converged* when that fit did not converge." + _recovery_sentence(
            context.get("recovery")), ""]
    counts = claims["status"].value_counts()
    lines += ["Summary: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES) + ".", ""]
    for claim, g in claims.groupby("claim", sort=False):
        lines += [f"## {claim}", ""]
        shown = claims_display(g).drop(columns=["status"])
        shown.insert(1, "paper model", g["paper_model"].to_numpy())
        shown["status"] = g["status"].to_numpy()
        shown["why"] = g["reason"].to_numpy()
        lines += [markdown_table(shown)]
        by_source: dict[str, list[str]] = {}
        for quantity, source in zip(g["quantity"], g["source"], strict=True):
            by_source.setdefault(source, [])
            if quantity not in by_source[source]:
                by_source[source].append(quantity)
        if len(by_source) == 1:
            lines += [f"Paper source: {next(iter(by_source))}.", ""]
        else:
            lines += ["Paper sources: " + "; ".join(f"{', '.join(q)}: {src}" for src, q in
                                                    by_source.items()) + ".", ""]
    return "\n".join(lines)
