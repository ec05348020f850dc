"""The toy world: the task, its tokenizer and tiny models (solver and critics), building a world,
the shipped worlds' folders, and world.py, the one door the method goes through."""
