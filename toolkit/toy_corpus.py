"""
A small synthetic corpus for the offline classroom run and the steering experiment.

Every document stays on one topic: its nouns and the adjectives before them all come from that
topic's lists below, while the sentence frames, names, days and numbers around them are shared
by all topics. So the only thing that tells topics apart is which content words co-occur, which
is exactly what a small TopK LM should pick up in a few minutes, and what a steered neuron can
change.

Each topic word is a single GPT-2 token with a leading space (" job"), and the sentence frames
always put it after a space in lower case, so a topic word is always that one token.
The lists share no word, and no frame or name contains one: a script can count how many
generated samples mention `work` by looking for the words of TOPICS["work"].

    from toy_corpus import TOPICS, generate
    docs = generate(n_docs=100, seed=0)   # list of str, deterministic in seed
"""
import random

TOPICS = {topic: words.split() for topic, words in {
    "work": "job office salary manager career meeting colleague boss employee deadline "
            "promotion contract interview company client desk wage staff shift employer",
    "cooking": "kitchen soup bread oven recipe salt butter onion garlic pan flour sugar "
               "cheese sauce pepper rice egg chicken dinner spoon",
    "sports": "ball team goal coach match player score stadium referee league soccer tennis "
              "football trophy race season tournament championship athlete",
    "weather": "rain snow wind cloud storm thunder fog frost ice sky sun temperature forecast "
               "weather umbrella lightning breeze rainbow hail",
    "animals": "dog cat horse bird fish cow sheep rabbit lion tiger wolf bear fox duck mouse "
               "pig goat owl deer frog",
    "music": "song guitar piano drum band singer melody concert violin music album rhythm "
             "chorus jazz orchestra lyrics tune choir",
    "travel": "train airport ticket hotel beach map passport luggage flight island trip bus "
              "tour suitcase journey tourist harbor ferry",
    "garden": "flower tree garden seed soil leaf grass plant root tomato carrot bush fence "
              "weed bloom apple vegetable hedge",
}.items()}

# Adjectives of each topic, one right before the first noun of every sentence ("the salty soup").
# Without them every noun stands in the same contexts as every other ("the ___") and only words
# a sentence apart tell topics apart: nouns and their embeddings start interchangeable, and a
# toy-config model still left them so after 2,000 steps (each noun got 1/8 of its topic's
# probability, measured). An adjacent cue is learned like a bigram, which groups the nouns of
# a topic within 100-200 steps, and from there the model learns to keep a document on topic.
QUALITIES = {topic: words.split() for topic, words in {
    "work": "busy paid corporate urgent weekly senior",
    "cooking": "hot fresh salty spicy crispy tasty",
    "sports": "fast winning athletic rival professional amateur",
    "weather": "cold rainy cloudy sunny icy chilly",
    "animals": "wild furry hungry fierce sleepy stray",
    "music": "loud classical catchy acoustic noisy electric",
    "travel": "foreign overseas cheap crowded scenic tropical",
    "garden": "green ripe muddy planted fertile organic",
}.items()}

N_DOCS = 24000  # about 2M GPT-2 tokens with the frames below (prepare.py --dataset=toy)

NAMES = ("Anna Ben Maria Tom Lucy David Sara Omar Mia Leo Emma Noah Grace Sam Nina Paul "
         "Hugo Alice Ravi Chen Yuki Elena Jonas Fatima Kofi Ines Marco Lena Pedro Zoe").split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
PARTS_OF_DAY = "morning afternoon evening night".split()
ADJECTIVES = ("new old big small strange perfect simple nice special beautiful different "
              "good great funny quiet long short lovely odd famous").split()
OWNERS = "the the the this that my her his our their".split()  # "a"/"an" would need the word

# Sentence frames: {w} and {v} are topic words (always written after a space, lower case).
FRAMES = [
    "{name} thought about {own} {w} all {part}.",
    "On {day}, {name} and {name2} talked about the {w} and the {v}.",
    "The {w} was {adj}, and the {v} was even more {adj2}.",
    "There were {num} people around the {w} that {part}.",
    "{name} asked {name2}: \"Where is {own} {w}?\"",
    "It took {num} minutes to find the {w}.",
    "{name} wrote {num} pages about the {w} and the {v}.",
    "Later that {part}, the {w} looked {adj}.",
    "Nobody expected the {w} to be so {adj}.",
    "Why is the {w} always next to the {v}?",
    "{name} said the {w} was the best part of the {v}.",
    "After the {w}, {name} went back and thought about the {v} again.",
    "For {name}, nothing mattered more than the {w}.",
    "{name} loved the {w} more than the {v}.",
    "In {year}, the {w} changed everything for {name}.",
    "The story of the {w} began {num} years ago.",
    "{name} still remembers the {w} from that {day}.",
    "\"The {w} is {adj},\" said {name}, \"but the {v} is {adj2}.\"",
    "Every {day}, {name} checks the {w} before the {v}.",
    "{name} and {name2} spent {num} hours on the {w}.",
    "Without the {w}, the {v} would not be the same.",
    "{name} told {name2} about {own} {w}.",
    "Then the {w} and the {v} were {adj} again.",
    "Some say the {w} is older than the {v}.",
]
OPENINGS = [
    "A short note about the {w}.",
    "This is the story of {name} and the {w}.",
    "{name} has a lot to say about the {w}.",
    "Notes from {day}: the {w} and the {v}.",
    "Here is what happened with the {w}.",
]
CLOSINGS = [
    "That is all about the {w} for now.",
    "{name} will never forget the {w}.",
    "And that is why the {w} matters.",
    "",
    "",
]


def fill(frame, topic, rng):
    """One sentence: the frame's slots filled with two distinct words of the topic, the first
    after one of the topic's adjectives, and neutral fillers."""
    w, v = rng.sample(TOPICS[topic], 2)
    name, name2 = rng.sample(NAMES, 2)
    return frame.format(w=f"{rng.choice(QUALITIES[topic])} {w}", v=v, name=name, name2=name2,
                        own=rng.choice(OWNERS),
                        adj=rng.choice(ADJECTIVES), adj2=rng.choice(ADJECTIVES),
                        day=rng.choice(DAYS), part=rng.choice(PARTS_OF_DAY),
                        num=rng.randint(2, 99), year=rng.randint(1900, 2030))


def document(topic, rng):
    sentences = [fill(rng.choice(OPENINGS), topic, rng)]
    sentences += [fill(rng.choice(FRAMES), topic, rng) for _ in range(rng.randint(3, 9))]
    sentences.append(fill(rng.choice(CLOSINGS), topic, rng))
    # paragraphs of a few sentences, so the model also sees line breaks
    paragraphs, i = [], 0
    while i < len(sentences):
        n = rng.randint(2, 5)
        paragraphs.append(" ".join(s for s in sentences[i:i + n] if s))
        i += n
    return "\n\n".join(p for p in paragraphs if p)


def generate(n_docs=N_DOCS, seed=0):
    """n_docs documents, each on a topic drawn uniformly; the same seed gives the same corpus."""
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    return [document(rng.choice(topics), rng) for _ in range(n_docs)]
