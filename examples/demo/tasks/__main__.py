"""``python -m examples.demo.tasks --out_dir DIR``: writes the arithmetic task's splits and tokenizer."""

from examples.demo.tasks.arithmetic import main

if __name__ == "__main__":
    main()
