"""Two objects: the CPU recipe (config/shapes_cpu.py) on a mix of one-shape images and scenes of two shapes in
two corners (shapes.make_scenes), each named with its color, shape, size and place. The evaluation judges
two-object prompts too: whether both objects are there with their own colors (binding) and at their places, on
pairings seen in training and on never-seen ones (the attribute swaps of seen pairings). Binding is learnt late
and suddenly, and when differs by training seed; two settings bring it on sooner: training timesteps shifted toward
noise (t_shift, where the layout of a scene is decided) and a learning rate that stays at its peak. The budget is the
goal's wall time, not a count of steps: a run times its first steps and trains as many as fit in max_minutes of
loop (less than the goal: the rest is for the start-up and for a timing that can read fast), and at a constant rate the
first N steps are the same whatever the end, so a faster CPU, or bf16 where it pays, buys the late seeds their
steps. Its minutes, steps and scores: docs/results.md, "Two objects"."""

base = "shapes_cpu.py"
shapes_scenes = 0.5
t_shift = 4.0  # four in seven training timesteps above 3T/4 (uniform: one in four)
min_lr = 1e-3  # = lr: no decay
# the training loop's minutes, evaluations included; --max_minutes=0 --max_steps=N trains a fixed N instead
max_minutes = 16.0
max_steps = 5000
eval_interval = 500
