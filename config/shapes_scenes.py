"""Two objects: the CPU recipe (config/shapes_cpu.py) on a mix of one-shape images and scenes of two shapes in
two corners (shapes.make_scenes), each named with its color, shape, size and place. The evaluation judges
two-object prompts too: whether both objects are there with their own colors (binding) and at their places, on
pairings seen in training and on never-seen ones (the attribute swaps of seen pairings). Binding is learnt late
and suddenly; two settings bring it on within these steps: training timesteps shifted toward noise (t_shift, where
the layout of a scene is decided) and a learning rate that stays at its peak. Its minutes and scores:
docs/results.md, "Two objects"."""

base = "shapes_cpu.py"
shapes_scenes = 0.5
t_shift = 4.0  # four in seven training timesteps above 3T/4 (uniform: one in four)
min_lr = 1e-3  # = lr: no decay
max_steps = 5000
eval_interval = 500
