"""Everything that shows results to a person or a script: markdown tables (one run, or
mean ± spread over seeds), ``results.json`` with its provenance, CMC curves and ranked-list
pictures."""

from rmgl.reporting.plots import plot_cmc
from rmgl.reporting.ranked_list import ranked_list_figure
from rmgl.reporting.tables import results_table, seeds_table, write_results_json

__all__ = ["plot_cmc", "ranked_list_figure", "results_table", "seeds_table", "write_results_json"]
