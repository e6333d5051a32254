"""
The toolkit around the TopK LM of model.py: reading, steering and searching neurons, the post-hoc
route, exports, the explorer, ablations, benchmarks and the CPU fast paths. Its scripts run from
the repository's root as modules, e.g. python -m toolkit.explore --out_dir=out-toy.
"""
