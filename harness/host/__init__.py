"""The host: what this machine offers the matrix — its devices (NVML GPUs, the CPU), who else holds
them (hygiene), and how a matrix's device selector matches them."""
