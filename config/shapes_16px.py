"""The quick CPU recipe, for checks and tests: the CPU recipe's 1.2 M-parameter U-Net on shapes at
16 px, pixel by pixel (no patches), with stochastic DDIM-50 (its figures were measured with it). Its minutes and
adherence: README, "Results"."""

base = "shapes_cpu.py"
image_size = 16
patch_size = 1
sampler = "ddim"  # the sampler its adherence figures were measured with
steps = 50
eta = 1.0
