"""The quick CPU recipe, for checks and tests: the CPU recipe's 1.2 M-parameter U-Net on shapes at
16 px, pixel by pixel (no patches), with the default sampler (stochastic DDIM-50). Its minutes and
adherence: README, "Results"."""

base = "shapes_cpu.py"
image_size = 16
patch_size = 1
steps = 50
eta = 1.0
