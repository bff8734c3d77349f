"""Both views of a policy (issue 9): its quality in the loop against its open-loop recall.

``closed_vs_open``, from a closed-loop ``perplexity`` experiment (:mod:`sim.experiment.
closed_loop`): each run's quality in the loop, full attention's perplexity over the policy's
on the same tokens (1 = full attention; normalised to the full model as DynaKV's Fig. 10
normalises accuracy), against the policy's open-loop attention recall on full attention's
decode of those tokens (the trace replay's pass and metric), one point per policy and budget;
and a table of how well recall predicts the quality: Spearman's rank correlation
(``scipy.stats.spearmanr``) over all runs with a budget and within each budget, with ``n``
(not computed under 3 runs or when either column is constant). Full attention's own run (no
budget; recall and quality 1 by construction) is drawn as the reference, left out of the
correlations. The points go beside the figure as ``closed_vs_open.{csv,md}``, the correlations
as ``closed_vs_open_spearman.{csv,md}``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd

from sim.errors import KvsimError
from sim.figures.base import FIGURES, Figure, Results, atomic_write_table
from sim.figures.common import colour
from sim.figures.style import COLUMN_IN, MARKERS, apply_style, plt, save_figure

RECALL = "recall_open_loop"
QUALITY = "quality"


def spearman_table(points: pd.DataFrame) -> pd.DataFrame:
    """Spearman's rank correlation of ``recall_open_loop`` and ``quality`` over the points
    with a budget (``all``) and within each budget: columns ``scope``, ``n``, ``spearman_rho``,
    ``p_value`` (NaN under 3 points or for a constant column)."""
    from scipy.stats import spearmanr

    budgeted = points[points["budget"].notna()]
    scopes = [("all", budgeted)] + [
        (f"budget={budget:g}", group) for budget, group in budgeted.groupby("budget", sort=True)
    ]
    rows = []
    for scope, group in scopes:
        rho = p_value = math.nan
        if len(group) >= 3 and group[RECALL].nunique() > 1 and group[QUALITY].nunique() > 1:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = spearmanr(group[RECALL], group[QUALITY])
            rho, p_value = float(result.statistic), float(result.pvalue)
        rows.append({"scope": scope, "n": len(group), "spearman_rho": rho, "p_value": p_value})
    return pd.DataFrame(rows)


@FIGURES.register("closed_vs_open")
@dataclass
class ClosedVsOpen(Figure):
    """Closed-loop quality against open-loop recall per policy and budget, and the rank
    correlation table (see the module docstring)."""

    closed_loop_tasks: ClassVar[tuple[str, ...]] = ("perplexity",)
    stem: str = "closed_vs_open"

    def points(self, results: Results) -> pd.DataFrame:
        """One row per run: ``run``, ``budget`` (the policy's; NaN without one), recall,
        quality, ``ppl_ratio``."""
        summary = results.summary
        missing = [c for c in ("run_id", RECALL, QUALITY, "ppl_ratio") if c not in summary]
        if summary.empty or missing:
            raise KvsimError(
                f"{self.name}: {results.dir}/summary.csv has "
                f"{'no runs' if summary.empty else 'no ' + ', '.join(missing)} (it is drawn "
                "from a closed_loop perplexity experiment's results)"
            )
        budgets = [results.settings(str(run_id))["policy"].get("budget")
                   for run_id in summary["run_id"]]
        return pd.DataFrame({
            "run": summary["run"].astype(str), "budget": pd.array(budgets, dtype="Float64"),
            RECALL: summary[RECALL].astype(float), QUALITY: summary[QUALITY].astype(float),
            "ppl_ratio": summary["ppl_ratio"].astype(float),
        }).astype({"budget": float})

    def draw(self, results: Results) -> list[Path]:
        points = self.points(results)
        table = spearman_table(points)
        stem = results.out_dir / self.stem
        written = atomic_write_table(points, stem)
        written += atomic_write_table(table, stem.with_name(f"{self.stem}_spearman"))
        apply_style()
        fig, ax = plt.subplots(figsize=(COLUMN_IN, 2.8))
        labels = list(dict.fromkeys(points.loc[points["budget"].notna(), "run"]))
        budgets = sorted(points["budget"].dropna().unique())
        for row in points.itertuples(index=False):
            if math.isnan(row.budget):
                ax.plot(getattr(row, RECALL), getattr(row, QUALITY), "*", color="black", ms=8,
                        label=f"{row.run} (no budget)")
                continue
            ax.plot(getattr(row, RECALL), getattr(row, QUALITY),
                    MARKERS[budgets.index(row.budget) % len(MARKERS)],
                    color=colour(labels.index(row.run)), ms=5, ls="none")
        for i, label in enumerate(labels):  # legend: colour = policy, marker = budget
            ax.plot([], [], "o", color=colour(i), ms=5, label=label)
        for i, budget in enumerate(budgets):
            ax.plot([], [], MARKERS[i % len(MARKERS)], color="grey", ms=5,
                    label=f"budget {budget:g}")
        overall = table.iloc[0]
        ax.set_title(f"Spearman rho = {overall['spearman_rho']:.2f} (n = {overall['n']})")
        ax.set_xlabel("open-loop attention recall (share of mass)")
        ax.set_ylabel("closed-loop quality\n(full perplexity / policy perplexity)")
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        return written + save_figure(fig, stem)
