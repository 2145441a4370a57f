"""Every figure the scripts write, one module per family; each function takes tidy tables or arrays and returns a
matplotlib figure (saved by `Run.save_figure` as PDF + PNG). Shared styling and layout helpers: `common.plots`."""
