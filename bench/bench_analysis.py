"""Stage 07 at the paper's scale: the factor model on 33,864 questions x 5 trials x 2 arms.

Responses are simulated from known effects (:mod:`mislib.simulate`), so besides the time the
benchmark reports the sampler's diagnostics and how many true effects the 95 % intervals
cover. Targets: the whole fit (build, compile, sample, summaries) within 3 minutes on a
2-core machine, R-hat <= 1.01 and no divergences. ``compare_centring`` (also run here on a
smaller study) times centred against non-centred random intercepts.

``python -m bench --only analysis`` (``--quick``: 3,000 questions).
"""

from __future__ import annotations

import os
import time

from mislib.analysis import ModelSpec, SamplerSettings, fit_factor_model
from mislib.simulate import PAPER_N_QUESTIONS, scored_table, simulate_study

# With the whitened fixed effects 250 tuning steps adapt the step size and the diagonal
# mass matrix without divergences; the draws go to sampling instead, since the check takes
# the largest R-hat over ~1,500 monitored random intercepts: for 1,500 independent normal
# draws (arviz rank R-hat, six simulations) it is 1.009-1.019 with 2 x 500 draws and
# 1.004-1.005 with 2 x 1,200.
DRAWS = 1200
TUNE = 250
CHAINS = 2


def _coverage(fit, study) -> float:
    est = fit.effects.set_index("term").join(study.truth.set_index("term")["value"],
                                             how="inner")
    return float(((est["lo95"] <= est["value"]) & (est["value"] <= est["hi95"])).mean())


def _figures(label: str, fit, study, wall: float, cpu: float) -> list[dict]:
    d = fit.diagnostics
    common = {"bench": "factor_model", "case": label, "n_questions": d["n_questions"],
              "n_trials": d["n_trials"], "draws": d["draws"], "tune": d["tune"],
              "chains": d["chains"], "centred": d["centred"], "cpus": os.cpu_count()}
    return [
        {**common, "metric": "fit_wall_s", "value": round(wall, 1), "unit": "s",
         "target": "<= 180", "cpu_s": round(cpu, 1), **{f"{k}_s": v for k, v in
                                                           d["seconds"].items()}},
        {**common, "metric": "max_r_hat", "value": round(d["max_r_hat"], 4),
         "target": "<= 1.01", "max_r_hat_fixed": round(d["max_r_hat_fixed"], 4),
         "worst_terms": fit.effects.nlargest(3, "r_hat")["term"].tolist(),
         "max_r_hat_random": d["max_r_hat_random"],
         "sd_r_hat": dict(zip(fit.sds["term"], fit.sds["r_hat"].round(4), strict=True))},
        {**common, "metric": "divergences", "value": d["divergences"], "target": "0"},
        {**common, "metric": "min_ess_bulk", "value": round(d["min_ess_bulk"], 1),
         "min_ess_bulk_fixed": round(d["min_ess_bulk_fixed"], 1),
         "ess_bulk_per_s": round(d["min_ess_bulk"] / d["seconds"]["sample"], 2)},
        {**common, "metric": "recovery_coverage_95", "value": round(_coverage(fit, study), 3),
         "n_effects": len(fit.effects)},
        {**common, "metric": "ppc_inside_share", "value": round(d["ppc_inside_share"], 3)},
    ]


def fit_study(n_questions: int, centred=(), seed: int = 7, draws: int = DRAWS,
              tune: int = TUNE, chains: int = CHAINS, label: str = "paper"):
    """Simulate one model x 2 arms x 5 trials, fit, and return the figures."""
    study = simulate_study(n_questions=n_questions, n_trials=5, models=("sim-vlm",),
                           seed=seed)
    scored = scored_table(study)
    t0, c0 = time.perf_counter(), time.process_time()
    fit = fit_factor_model(scored, ModelSpec(centred=centred),
                           SamplerSettings(draws=draws, tune=tune, chains=chains, seed=seed),
                           progress=False)
    return _figures(label, fit, study, time.perf_counter() - t0, time.process_time() - c0)


def compare_centring(n_questions: int = 3000) -> list[dict]:
    """The same study with every random intercept centred, non-centred (the default), and
    ``"auto"`` (centred where a level has >= 250 trials)."""
    out = []
    for label, centred in (("all_centred", ["question", "pair", "volume"]),
                           ("all_noncentred", []), ("auto", "auto")):
        out += [dict(f, comparison="centring")
                for f in fit_study(n_questions, centred=centred, label=label)]
    return out


def run(quick: bool = False) -> list[dict]:
    if quick:
        return fit_study(3000, label="quick")
    return fit_study(PAPER_N_QUESTIONS) + compare_centring()
