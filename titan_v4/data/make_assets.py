"""Generate the default training corpus and tokenizer shipped in ``titan_v4/data/assets/``.

    python -m titan_v4.data.make_assets            # rewrite the shipped assets
    python -m titan_v4.data.make_assets --out DIR  # write them elsewhere (tests compare the two)

Everything is deterministic: the corpus comes from a seeded ``random.Random`` and the tokenizer is
a byte-level BPE trained on it with the ``tokenizers`` library, so re-running this script
reproduces the committed files byte for byte (tests/data/test_assets.py checks it; BPE tie-breaking
may differ in other ``tokenizers`` releases, so the tokenizer is compared only under
``TOKENIZERS_VERSION``, the release that produced the shipped file).

The corpus is built to be *learnable*: templated sentences over small fixed tables (countries and
capitals, animals and sounds, counting, simple sums, short stories with consistent arithmetic), so
a tiny model's loss falls clearly within ~100 CPU steps. It is one document per line.

Files written:
    corpus.txt             ~420 KB (~105k tokens), one document per line
    tokenizer.json         byte-level BPE, 2048 tokens; ids 0/1/2 = <|bos|> <|eos|> <|pad|>
    tokenizer_config.json  names the BOS/EOS/PAD tokens for torchtitan's HuggingFaceTokenizer
"""

import argparse
import json
import os
import random

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

TOKENIZERS_VERSION = "0.23.3"
SEED = 1234
NUM_DOCUMENTS = 1000
VOCAB_SIZE = 2048
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

NAMES = (
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate",
    "Liam", "Mia", "Noah", "Olivia", "Paul", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera",
    "Will", "Xena", "Yuri", "Zoe",
)  # fmt: skip
ITEMS = (
    "apples", "books", "coins", "pencils", "marbles", "stamps", "shells", "cookies", "cards",
    "stones", "flowers", "tickets", "buttons", "candles", "eggs", "keys",
)  # fmt: skip
CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "Delhi"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"), ("Brazil", "Brasilia"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Russia", "Moscow"),
    ("Australia", "Canberra"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
)  # fmt: skip
ANIMALS = (
    ("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"),
    ("pig", "oink"), ("owl", "hoot"), ("horse", "neigh"), ("frog", "croak"), ("lion", "roar"),
    ("mouse", "squeak"), ("bee", "buzz"), ("snake", "hiss"), ("wolf", "howl"),
)  # fmt: skip
COLORS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "grey")
PLACES = ("the park", "the school", "the market", "the river", "the library", "the garden", "the beach")
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _story(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    n, m = rng.randint(1, 40), rng.randint(1, 40)
    place = rng.choice(PLACES)
    return (
        f"{a} went to {place} with {n} {item}. {b} gave {a} {m} more {item}. "
        f"Now {a} has {n + m} {item}. {a} said thank you to {b}."
    )


def _sums(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 6)):
        x, y = rng.randint(0, 999), rng.randint(0, 999)
        if rng.random() < 0.5:
            lines.append(f"{x} + {y} = {x + y}.")
        else:
            x, y = max(x, y), min(x, y)
            lines.append(f"{x} - {y} = {x - y}.")
    return "Let us do some sums. " + " ".join(lines)


def _counting(rng: random.Random) -> str:
    start, step = rng.randint(0, 900), rng.randint(1, 12)
    seq = ", ".join(str(start + i * step) for i in range(rng.randint(6, 12)))
    words = " ".join(NUMBER_WORDS[: rng.randint(5, 21)])
    return f"Counting up by {step} from {start}: {seq}. In words we count {words}."


def _capitals(rng: random.Random) -> str:
    facts = [f"The capital of {country} is {city}." for country, city in rng.sample(CAPITALS, rng.randint(3, 6))]
    return " ".join(facts)


def _animals(rng: random.Random) -> str:
    sentences = []
    for animal, sound in rng.sample(ANIMALS, rng.randint(3, 5)):
        color = rng.choice(COLORS)
        sentences.append(f"The {color} {animal} says {sound}. A {animal} always says {sound}.")
    return " ".join(sentences)


def _week(rng: random.Random) -> str:
    i = rng.randrange(len(DAYS))
    today, tomorrow, yesterday = DAYS[i], DAYS[(i + 1) % 7], DAYS[(i - 1) % 7]
    name = rng.choice(NAMES)
    return (
        f"Today is {today}. Tomorrow is {tomorrow}. Yesterday was {yesterday}. "
        f"On {tomorrow} {name} will go to {rng.choice(PLACES)}."
    )


TEMPLATES = (_story, _sums, _counting, _capitals, _animals, _week)


def make_corpus(seed: int = SEED, num_documents: int = NUM_DOCUMENTS) -> list[str]:
    """The shipped corpus: ``num_documents`` documents, each 2-4 templated paragraphs on one line."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(TEMPLATES)(rng) for _ in range(rng.randint(2, 4))) for _ in range(num_documents)]


def train_tokenizer(documents: list[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE over ``documents`` (any UTF-8 text stays encodable: all 256 bytes are in)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    # min_frequency=1: the corpus has few distinct words, so merges of single occurrences (mostly
    # numbers) are what fills the vocabulary up to exactly vocab_size.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[BOS, EOS, PAD],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def write_assets(out_dir: str) -> None:
    """Write corpus.txt, tokenizer.json and tokenizer_config.json into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    documents = make_corpus()
    with open(os.path.join(out_dir, "corpus.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(documents) + "\n")
    train_tokenizer(documents).save(os.path.join(out_dir, "tokenizer.json"), pretty=False)
    # Read by torchtitan's HuggingFaceTokenizer to find BOS/EOS; the dataset adds them itself.
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "add_bos_token": False, "add_eos_token": False}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8", newline="\n") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=ASSETS_DIR, help="output directory (default: the shipped assets)")
    args = parser.parse_args()
    write_assets(args.out)
    for name in sorted(os.listdir(args.out)):
        print(f"{os.path.getsize(os.path.join(args.out, name)):>9,d}  {os.path.join(args.out, name)}")


if __name__ == "__main__":
    main()
