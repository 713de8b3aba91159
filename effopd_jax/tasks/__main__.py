"""``python -m effopd_jax.tasks --out_dir DIR``: writes the arithmetic task's splits and tokenizer."""

from effopd_jax.tasks.arithmetic import main

if __name__ == "__main__":
    main()
