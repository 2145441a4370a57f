"""The analyses: pure computations over captured records and streamed counts (routing decisiveness and
distributions, specialization counts and metrics, expert profiles). Infrastructure (models, hooks, data, stats,
runs) lives beside this package in `common/`; scripts combine the two.
"""

# The label of the row that pools every domain, in every table the analyses write.
ALL_DOMAINS = "all"
