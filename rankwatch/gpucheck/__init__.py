"""`rankwatch gpu-check`: the GPU collector, the XID listener and the probe's CUDA path checked
against a real NVIDIA GPU and against `nvidia-smi`, in one command (`make gpu-check`).

``smi`` parses ``nvidia-smi -q -x``; ``checks`` holds the pure comparisons (run on a CPU in the
tests, against recorded or simulated readings); ``runner`` does the I/O: NVML, scrapes,
`nvidia-smi`, a matmul load and the probe timing check.
"""
