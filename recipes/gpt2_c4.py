"""Pre-train GPT-2 on C4 token shards made by `timl tokenize`.

    accelerate launch recipes/gpt2_c4.py --model_name gpt2 --output_dir models/gpt2_c4 \
        --train_file_pattern "data/gpt2_c4/train_*.bin" --eval_file_pattern "data/gpt2_c4/validation_*.bin" ...

The same flags work under torchrun and plain python; `python recipes/gpt2_c4.py args.yaml` reads them from a file.
It is `timl train` (timl.train.pretrain.main), as a script that launchers can start by path.
"""

from timl.train.pretrain import main

if __name__ == "__main__":
    main()
