"""Two objects: the CPU recipe (config/shapes_cpu.py) on a mix of one-shape images and scenes of two shapes in
two corners (shapes.make_scenes), each named with its color, shape, size and place. The evaluation judges
two-object prompts too: whether both objects are there with their own colors (binding) and at their places, on
pairings seen in training and on never-seen ones (the attribute swaps of seen pairings). Its minutes and scores:
docs/results.md, "Two objects"."""

base = "shapes_cpu.py"
shapes_scenes = 0.5
max_steps = 6000
eval_interval = 500
