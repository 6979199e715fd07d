"""What the clusters do: record every routing decision of a routed checkpoint on GLUE inputs and describe it.

    python -m finetune.analysis --checkpoint CKPT [--adapter DIR] --tasks rte sst2 cola \\
        --data-dir GLUE_DIR --max-examples 200 --out results/NAME

writes `NAME/routing.json` (every number, versioned by `format_version`), PNG figures and `NAME/summary.md`. From
Python: `analyze(AnalyzeSettings(out=..., checkpoint=...))`. The model runs on the CPU unless `device` says otherwise.

Modules, each testable on its own:

* `statistics`: pure numpy/scipy functions on plain arrays (load, entropy, co-selection, permutation tests).
* `record`: the inputs (GLUE items), the model, and `RoutingRecorder`, forward hooks on every `RoutedLlamaRouter`.
  With an adapter every input runs twice: with the adapter (the fine-tuned model) and inside `disable_adapter()`
  (the converted model).
* `report`: every number of the report from the recordings; `summary`: summary.md; `figures`: the PNGs.
* `cli`: `AnalyzeSettings` (validated once; the command line is generated from it), `analyze`, `main`.

Definitions (per routed layer; N clusters, k kept per token, M non-padding tokens):

* load_e = (tokens that keep cluster e) / (M * k): the fraction of token-selections; sums to 1, uniform = 1/N.
* token share_e = load_e * k: the fraction of tokens that keep cluster e; uniform = k/N.
* normalised entropy = H(load) / log N, in [log k / log N, 1]: a router that always keeps the same k clusters has
  log k / log N (0.8 for k = 16 of N = 32), not 0; 1 means perfectly even load.
* busiest share = the token share of the most-kept cluster (k/N when the load is even, 1 when every token keeps it).
* co-selection C[i, j] = tokens that keep both i and j (C[i, i] = tokens that keep i); normalised by M; lift =
  C[i, j] / M divided by share_i * share_j (1 = chosen together as often as if independent; the exact-k constraint
  makes "independent" only a reference point); correlation = the phi coefficient of the two keep-indicators over
  tokens (bounded, so rare clusters do not dominate it; the exact-k constraint puts its mean at about -1/(N-1)).
* specialisation: a group's (task's, label's) load over its tokens. The statistic is the mean over pairs of groups
  of the total-variation distance between their load distributions (or Pearson's chi-square of the groups x clusters
  table of selections, `statistic="chi2"`), summed over layers. Its p-value is a permutation test that shuffles the
  group of whole examples (tokens of one example are not independent), (1 + #{null >= observed}) / (1 + n).
  The label test shuffles labels only among examples of the same task (strata), so that differences between tasks
  cannot pass for differences between labels; it is also run one task at a time. Per cluster the effect is the
  range of its token share across groups (percentage points), with a permutation p-value and one corrected for all
  clusters of all layers (max-T).
* change (with an adapter): the fine-tuned load minus the converted load on the same tokens, the fraction of a
  token's kept clusters that stay the same, and a paired sign-flip permutation test (per example, swap the two
  models) of the total-variation distance between the two loads, summed over layers.

Token scopes: "all" counts every non-padding token; "text" only tokens that overlap the GLUE texts, not the field
names `finetune.tasks.format_example` adds ("Premise:", "Review:", ...), which differ between tasks by construction.
The specialisation tests are reported for both scopes.
"""

from .cli import AnalyzeSettings, analyze, main
from .record import AnalysisError
from .report import FORMAT_VERSION

__all__ = ["AnalyzeSettings", "analyze", "main", "AnalysisError", "FORMAT_VERSION"]
