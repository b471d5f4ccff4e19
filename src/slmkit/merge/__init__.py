"""Model merging (`slm merge`): linear, task arithmetic, TIES, DARE, Model Stock and SLERP over saved model dirs.

- `methods`: the arithmetic, one function per method, on the tensors of one name;
- `spec`: the config in mergekit's YAML shape, read and checked, and parameters resolved per tensor;
- `run`: loading, compatibility checks, the merge over the state dicts, the output model dir.
"""
