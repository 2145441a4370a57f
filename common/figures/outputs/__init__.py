"""Every file a script writes, declared beside its figures: one module per family of analyses (`routing`,
`representations`, `causal`, `probing`), each an `OUTPUTS` tuple of `Output` entries, with `entry` holding the
entry type and the column texts several families share. The registry `common.run.outputs` assembles them (after the
run-metadata entries) into the README.md of every run folder. A new script adds its files to its family's module;
nothing here imports matplotlib, torch or pandas."""
