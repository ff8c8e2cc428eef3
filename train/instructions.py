"""Instruction prompts for self-distilling EAGLE heads of chat models (EAGLE trains on
ShareGPT-style chat; nothing comes from a dataset hub here).

    from kvjax.train import instructions
    prompts = instructions.prompts(3000, seed=0)   # 3,000 distinct user turns, deterministic

Written for kvjax: a set of task families (explain, how-to, write, list, compare, advise,
rewrite, code, arithmetic, classify, define, summarise, plan, opinion), each a few phrasings with
slots filled from subject lists: 3,017 distinct prompts in all. An evaluation set must be
written apart from them (other tasks and subjects); `overlap` measures how much two prompt
sets share (their common word 4-grams)."""

from __future__ import annotations

import itertools
import re

import numpy as np

SCIENCE = (
  "photosynthesis",
  "plate tectonics",
  "the water cycle",
  "black holes",
  "vaccines",
  "the greenhouse effect",
  "DNA replication",
  "evolution by natural selection",
  "magnetism",
  "the speed of light",
  "nuclear fusion",
  "static electricity",
  "the immune system",
  "ocean tides",
  "rainbows",
  "earthquakes",
  "volcanoes",
  "the seasons",
  "gravity",
  "antibiotics",
  "the periodic table",
  "sound waves",
  "friction",
  "cell division",
  "the nitrogen cycle",
  "solar eclipses",
  "erosion",
  "fermentation",
  "buoyancy",
  "lightning",
)
TECH = (
  "how a search engine works",
  "public-key encryption",
  "what a compiler does",
  "cloud storage",
  "how Wi-Fi works",
  "machine learning",
  "a database index",
  "how GPS finds a location",
  "version control",
  "how a CPU executes instructions",
  "two-factor authentication",
  "what an API is",
  "how email reaches its recipient",
  "solid-state drives",
  "web cookies",
  "how QR codes store data",
  "virtual memory",
  "open-source software",
  "how a touchscreen senses a finger",
  "data compression",
)
AUDIENCES = (
  "a ten-year-old",
  "a high school student",
  "my grandmother",
  "a busy manager",
  "someone who has never studied science",
  "a new employee",
  "a curious teenager",
)
EXPLAIN = (
  "Explain {topic} to {audience}.",
  "Can you explain {topic} in simple terms?",
  "What is {topic}, and why does it matter?",
  "Give me a short explanation of {topic}.",
  "How would you describe {topic} to {audience}?",
)
HOWTO_TASKS = (
  "keep basil alive indoors",
  "remove a coffee stain from a shirt",
  "start running regularly",
  "organise a small closet",
  "learn to touch type",
  "make a simple budget",
  "sharpen a kitchen knife",
  "fall asleep faster",
  "prepare for a job interview",
  "write a polite complaint",
  "clean a cast iron pan",
  "save money on groceries",
  "memorise a short speech",
  "set up a home aquarium",
  "reduce screen time",
  "change a bicycle tyre",
  "make bread without yeast",
  "plan a birthday party on a budget",
  "keep a journal",
  "start learning a new language",
  "repot a houseplant",
  "stay focused while studying",
  "pack for a week-long trip with one bag",
  "brew better coffee at home",
  "care for a new puppy",
)
HOWTO = (
  "How do I {task}?",
  "What is the best way to {task}?",
  "Give me step-by-step instructions to {task}.",
  "I want to {task}. Where should I start?",
  "What mistakes should I avoid when I try to {task}?",
)
FORMS = (
  "a short poem",
  "a haiku",
  "a limerick",
  "a two-paragraph story",
  "a product description",
  "a thank-you note",
  "a short speech",
  "a diary entry",
  "a riddle",
  "a motivational message",
  "a news headline and a one-sentence summary",
  "a dialogue between two friends",
)
SUBJECTS = (
  "a lighthouse keeper",
  "autumn leaves",
  "a lost umbrella",
  "the first day of school",
  "a robot learning to paint",
  "a quiet library",
  "a thunderstorm at night",
  "a forgotten garden",
  "a cat who hates Mondays",
  "the smell of rain",
  "a train journey through mountains",
  "an old wooden bridge",
  "a street market at dawn",
  "a snowman in spring",
  "a bakery on a corner",
  "a kite stuck in a tree",
  "an astronaut's last day in orbit",
  "a dragon afraid of fire",
)
WRITE = (
  "Write {form} about {subject}.",
  "Compose {form} about {subject}.",
  "Could you write {form} featuring {subject}?",
  "I need {form} about {subject}, please.",
)
LIST_ITEMS = (
  "healthy breakfast ideas",
  "indoor hobbies",
  "ways to reuse glass jars",
  "fun facts about octopuses",
  "questions to ask on a first date",
  "board games for families",
  "ways to be more productive",
  "names for a pet turtle",
  "things to do on a rainy day",
  "easy vegetables to grow",
  "tips for public speaking",
  "classic novels worth reading",
  "stretches for desk workers",
  "cheap weekend activities",
  "ways to say thank you",
  "habits of good listeners",
  "items for a first aid kit",
  "snacks for a long hike",
)
LIST = (
  "List {n} {items}.",
  "Give me {n} {items}.",
  "What are {n} good {items}?",
  "Suggest {n} {items}, with one sentence on each.",
)
PAIRS = (
  ("cats", "dogs as pets"),
  ("tea", "coffee"),
  ("renting", "buying a home"),
  ("electric cars", "petrol cars"),
  ("e-books", "printed books"),
  ("running", "swimming"),
  ("working from home", "working in an office"),
  ("trains", "planes for a 500 km trip"),
  ("a laptop", "a tablet for a student"),
  ("summer", "winter holidays"),
  ("learning piano", "learning guitar"),
  ("city life", "country life"),
  ("Python", "JavaScript for a beginner"),
  ("saving", "investing"),
)
COMPARE = (
  "Compare {a} and {b}.",
  "What are the pros and cons of {a} versus {b}?",
  "Should I choose {a} or {b}? Explain the differences.",
  "How do {a} and {b} differ?",
)
FEELINGS = ("nervous", "stressed", "unmotivated", "overwhelmed", "lonely", "bored", "frustrated")
SITUATIONS = (
  "starting a new job",
  "moving to a new city",
  "my exams next week",
  "a difficult conversation with a friend",
  "learning to drive",
  "a presentation at work",
  "keeping up with housework",
  "my long commute",
  "making new friends as an adult",
  "a project that keeps getting delayed",
)
ADVISE = (
  "I feel {feeling} about {situation}. What can I do?",
  "Any advice for someone {feeling} about {situation}?",
  "How can I stop feeling {feeling} about {situation}?",
)
SENTENCES = (
  "The meeting has been moved to Thursday because the room is unavailable.",
  "Our shop will be closed on Monday for repairs.",
  "I can't come to the party, sorry.",
  "The results of the experiment were not what we expected.",
  "Please send me the report by Friday.",
  "The weather ruined our picnic, but we had fun anyway.",
  "This phone has a great camera and a long battery life.",
  "We need more volunteers for the charity run.",
  "The train was late again this morning.",
  "Thank you for helping me move last weekend.",
)
STYLES = (
  "more formal",
  "more casual",
  "more polite",
  "as a pirate would say it",
  "shorter",
  "more enthusiastic",
  "for a children's book",
  "as a formal email",
)
REWRITE = (
  'Rewrite this sentence {style}: "{sentence}"',
  'Make this {style}: "{sentence}"',
  'Can you rephrase the following {style}? "{sentence}"',
)
CODE_TASKS = (
  "reverses a string",
  "checks whether a number is prime",
  "counts the vowels in a sentence",
  "returns the largest item in a list",
  "converts Celsius to Fahrenheit",
  "removes duplicates from a list",
  "checks whether a word is a palindrome",
  "computes the factorial of n",
  "merges two sorted lists",
  "counts how often each word appears in a text",
  "returns the n-th Fibonacci number",
  "flattens a nested list",
  "validates a simple email address",
  "sorts a list of names by length",
  "finds the average of a list of numbers",
  "capitalises the first letter of every word",
)
LANGUAGES = ("Python", "JavaScript", "Python", "Python")  # the model's strongest first
CODE = (
  "Write a {lang} function that {task}.",
  "Show me {lang} code that {task}.",
  "How would I write a {lang} function that {task}? Explain it briefly.",
)
ITEMS_BOUGHT = ("apples", "notebooks", "pencils", "tickets", "cupcakes", "stamps", "plants")
ARITH = (
  "If one of the {item} costs {p} dollars, how much do {n} cost?",
  "I had {m} {item} and gave away {n}. How many are left?",
  "A box holds {n} {item}. How many boxes do I need for {m} {item}?",
  "What is {m} plus {n}, and what is {m} times {n}?",
  "Split {m} {item} equally among {n} people. How many does each get, and how many are left over?",
)
CLASSIFY_THINGS = (
  "a tomato",
  "a whale",
  "a bat",
  "a penguin",
  "glass",
  "a mushroom",
  "a peanut",
  "a strawberry",
  "a spider",
  "coral",
  "a dolphin",
  "rhubarb",
  "a seahorse",
  "a cucumber",
)
CLASSIFY = (
  "Is {thing} a fruit, a vegetable, or neither?",
  "Is {thing} an animal, a plant, or something else?",
  "Which group does {thing} belong to, and why?",
)
WORDS = (
  "serendipity",
  "resilience",
  "ephemeral",
  "nostalgia",
  "algorithm",
  "democracy",
  "metaphor",
  "inflation",
  "biodiversity",
  "empathy",
  "procrastination",
  "irony",
  "ecosystem",
  "entropy",
  "etiquette",
  "hypothesis",
  "paradox",
  "sustainability",
)
DEFINE = (
  "What does the word '{word}' mean? Use it in a sentence.",
  "Define {word} and give an example.",
  "Explain the meaning of '{word}' in one or two sentences.",
)
PLANS = (
  "a three-day trip to a city I have never visited",
  "a week of simple vegetarian dinners",
  "a study schedule for a month before an exam",
  "a beginner's four-week workout routine",
  "a weekend spring cleaning of my flat",
  "a small vegetable garden on a balcony",
  "a reading list for a month",
  "a morning routine that starts at 6 am",
  "a surprise picnic for a friend",
  "a budget-friendly family holiday",
)
PLAN = ("Make me {plan}.", "Help me plan {plan}.", "Can you draft {plan}?")
OPINION_TOPICS = (
  "homework for young children",
  "four-day work weeks",
  "school uniforms",
  "tipping in restaurants",
  "banning cars from city centres",
  "learning cursive handwriting",
  "social media for teenagers",
  "daylight saving time",
  "zoos",
  "reading fiction",
)
OPINION = (
  "What are the arguments for and against {topic}?",
  "Give a balanced view on {topic}.",
  "Why do people disagree about {topic}?",
)
STORY_SUMMARIES = (
  "Cinderella",
  "the tortoise and the hare",
  "Romeo and Juliet",
  "Little Red Riding Hood",
  "the boy who cried wolf",
  "Jack and the beanstalk",
  "the three little pigs",
  "Robinson Crusoe",
  "Alice's Adventures in Wonderland",
  "the ugly duckling",
)
SUMMARISE = (
  "Summarise the story of {story} in three sentences.",
  "What is the moral of {story}?",
  "Tell the story of {story} in a few sentences for a child.",
)


def _family(templates, **slots):
  """Every template x every combination of its slot values (slots: name -> tuple of values,
  or tuple of dicts for slots filled together)."""
  names = list(slots)
  for t in templates:
    for values in itertools.product(*(slots[n] for n in names)):
      fill = {}
      for n, v in zip(names, values):
        fill.update(v if isinstance(v, dict) else {n: v})
      yield t.format(**fill)


def families() -> dict[str, list[str]]:
  """Every distinct prompt each task family can make, by family name (deterministic order)."""
  rng = np.random.default_rng(1234)  # the arithmetic's numbers, fixed
  numbers = [
    dict(m=int(rng.integers(12, 90)), n=int(rng.integers(2, 9)), p=int(rng.integers(2, 20)))
    for _ in range(6)
  ]
  made = {
    "explain": list(_family(EXPLAIN, topic=SCIENCE + TECH, audience=AUDIENCES)),
    "how-to": list(_family(HOWTO, task=HOWTO_TASKS)),
    "write": list(_family(WRITE, form=FORMS, subject=SUBJECTS)),
    "list": list(_family(LIST, n=("three", "five", "seven"), items=LIST_ITEMS)),
    "compare": list(_family(COMPARE, pair=tuple(dict(a=a, b=b) for a, b in PAIRS))),
    "advise": list(_family(ADVISE, feeling=FEELINGS, situation=SITUATIONS)),
    "rewrite": list(_family(REWRITE, style=STYLES, sentence=SENTENCES)),
    "code": list(_family(CODE, lang=sorted(set(LANGUAGES)), task=CODE_TASKS)),
    "arithmetic": list(_family(ARITH, item=ITEMS_BOUGHT, nums=tuple(numbers))),
    "classify": list(_family(CLASSIFY, thing=CLASSIFY_THINGS)),
    "define": list(_family(DEFINE, word=WORDS)),
    "plan": list(_family(PLAN, plan=PLANS)),
    "opinion": list(_family(OPINION, topic=OPINION_TOPICS)),
    "summarise": list(_family(SUMMARISE, story=STORY_SUMMARIES)),
  }
  return {k: list(dict.fromkeys(v)) for k, v in made.items()}  # a slot a template skips


def prompts(n: int, *, seed: int = 0) -> list[str]:
  """n distinct prompts drawn without replacement, every family in proportion to the square
  root of its size (so the large combinatorial families do not crowd out the small ones),
  shuffled with `seed`. Raises ValueError when n exceeds what the families hold."""
  fams = families()
  total = sum(len(v) for v in fams.values())
  if not isinstance(n, int) or not 1 <= n <= total:
    raise ValueError(f"n must be an int in [1, {total}] (the prompts the families hold); got {n!r}")
  rng = np.random.default_rng(seed)
  pools = {k: list(rng.permutation(v)) for k, v in fams.items()}
  weight = {k: np.sqrt(len(v)) for k, v in pools.items()}
  out: list[str] = []
  while len(out) < n:
    live = [k for k in pools if pools[k]]
    w = np.array([weight[k] for k in live])
    k = live[rng.choice(len(live), p=w / w.sum())]
    out.append(str(pools[k].pop()))
  return out


def _ngrams(text: str, k: int) -> set[tuple[str, ...]]:
  words = re.findall(r"[a-z0-9']+", text.lower())
  return {tuple(words[i : i + k]) for i in range(len(words) - k + 1)}


def overlap(held_out: list[str], train: list[str], k: int = 4) -> float:
  """The largest share of a held-out prompt's word k-grams that also occur in any training
  prompt (0: no held-out prompt shares a k-word phrase with the training set)."""
  seen = set().union(*(_ngrams(t, k) for t in train))
  worst = 0.0
  for h in held_out:
    grams = _ngrams(h, k)
    if grams:
      worst = max(worst, len(grams & seen) / len(grams))
  return worst
