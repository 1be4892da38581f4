"""Pre-train GPT-2 on C4 token shards made by `timl tokenize`.

    accelerate launch recipes/gpt2_c4.py --model_name gpt2 --output_dir models/gpt2_c4 \
        --train_file_pattern "data/gpt2_c4/train_*.bin" --eval_file_pattern "data/gpt2_c4/validation_*.bin" ...

The same flags work under torchrun and plain python; `python recipes/gpt2_c4.py args.yaml` reads them from a file.
"""

from timl.arguments import TrainingArguments, parse_args
from timl.recipe import ModelArguments, exit_on_run_error, pretrain

if __name__ == "__main__":
    model_args, training_args = parse_args(ModelArguments, TrainingArguments)
    with exit_on_run_error():
        pretrain(model_args, training_args)
