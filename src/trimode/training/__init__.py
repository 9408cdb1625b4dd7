"""Training for tri-mode models: ``trimode train`` (the joint AR + diffusion objective, spec
2.3) and the recipe of the embedded model's shipped adapter. Not imported by inference."""
