"""Hand-written Triton kernels, each beside its PyTorch reference. Models call only the public
functions exported here (see DESIGN.md, "Kernels")."""
