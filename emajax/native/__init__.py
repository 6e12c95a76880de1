"""Optional native kernels, built on first use; nothing else in emajax depends on them."""
