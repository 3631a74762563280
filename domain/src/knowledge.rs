//! Splitting knowledge base documents into chunks: by Markdown section
//! ([`sections`], what the knowledge base stores) or by overlapping word
//! windows ([`chunk`]); and fusing rankings ([`reciprocal_rank_fusion`]).

use std::collections::HashMap;

/// One chunk of a document: its text, prefixed with the document's title so
/// that its embedding carries the topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub ordinal: usize,
    pub text: String,
}

/// A title from a Markdown document's first `# ` heading, or its first line.
pub fn title_of(markdown: &str) -> Option<String> {
    let first = markdown.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(first.trim_start_matches('#').trim().to_string()).filter(|t| !t.is_empty())
}

/// Splits `body` into chunks of at most `max_words` words that overlap by
/// `overlap` words, breaking between paragraphs where possible (a paragraph
/// longer than a chunk is broken between words). Each chunk starts with the
/// title.
pub fn chunk(title: &str, body: &str, max_words: usize, overlap: usize) -> Vec<Chunk> {
    assert!(overlap < max_words, "overlap must be smaller than a chunk");
    let mut words_by_paragraph: Vec<Vec<&str>> = body
        .split("\n\n")
        .map(|p| p.split_whitespace().collect::<Vec<_>>())
        .filter(|p| !p.is_empty())
        .collect();
    // Drop the title line if the body repeats it as its heading.
    if let Some(first) = words_by_paragraph.first() {
        if first.first() == Some(&"#") && first[1..].join(" ") == title {
            words_by_paragraph.remove(0);
        }
    }
    let mut chunks: Vec<Vec<&str>> = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for paragraph in words_by_paragraph {
        // Break before a paragraph that does not fit, if the chunk is
        // already substantial, rather than in its middle.
        if current.len() + paragraph.len() > max_words && current.len() > max_words / 2 {
            flush(&mut current, &mut chunks, overlap);
        }
        for word in paragraph {
            if current.len() == max_words {
                flush(&mut current, &mut chunks, overlap);
            }
            current.push(word);
        }
    }
    if !current.is_empty() && (chunks.is_empty() || current.len() > overlap) {
        chunks.push(current);
    }
    chunks
        .into_iter()
        .enumerate()
        .map(|(ordinal, words)| Chunk {
            ordinal,
            text: format!("{title}\n{}", words.join(" ")),
        })
        .collect()
}

/// Ends the current chunk; the next one starts with its last `overlap` words.
fn flush<'a>(current: &mut Vec<&'a str>, chunks: &mut Vec<Vec<&'a str>>, overlap: usize) {
    let tail = current[current.len().saturating_sub(overlap)..].to_vec();
    chunks.push(std::mem::replace(current, tail));
}

/// Separates the parts of a heading path.
pub const HEADING_SEPARATOR: &str = " › ";
/// A block (a paragraph, a whole list, a code block) longer than this many
/// times the chunk size is split between its lines after all.
const MAX_BLOCK_FACTOR: usize = 4;

/// One section of an article, or a part of a long one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub ordinal: usize,
    /// The heading path: "Title › Section › Subsection".
    pub heading: String,
    /// The section's Markdown, headings excluded; lists and code blocks
    /// are never split (unless absurdly long).
    pub text: String,
}

impl Section {
    /// What is embedded: the heading path, then the text without Markdown.
    pub fn embedding_text(&self) -> String {
        format!(
            "{}\n{}",
            self.heading,
            crate::markdown::to_plain(&self.text)
        )
    }
}

fn heading_of(line: &str) -> Option<(usize, &str)> {
    let trimmed = line.trim_start();
    if line.len() - trimmed.len() > 3 {
        return None;
    }
    let level = trimmed.chars().take_while(|c| *c == '#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    let rest = &trimmed[level..];
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        return None;
    }
    Some((level, rest.trim().trim_end_matches('#').trim()))
}

fn is_fence(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("```") || t.starts_with("~~~")
}

/// A line that belongs to the list before it (an item, or indented).
fn continues_list(block: &str) -> bool {
    let t = block.trim_start();
    let indented = block.starts_with([' ', '\t']);
    let bullet = t.starts_with("- ") || t.starts_with("* ") || t.starts_with("+ ");
    let numbered = {
        let digits = t.chars().take_while(char::is_ascii_digit).count();
        digits > 0 && digits < 10 && t[digits..].starts_with(['.', ')'])
    };
    indented || bullet || numbered
}

/// Splits Markdown at its headings. `title` heads every path (a first `#`
/// heading equal to it is not repeated). Text before the first heading is
/// the title's own section. A section longer than `max_words` is cut
/// between blocks; a list with its items, a code block or a paragraph
/// stays whole.
pub fn sections(title: &str, markdown: &str, max_words: usize) -> Vec<Section> {
    let max_words = max_words.max(1);
    let title = title.trim();
    let mut path: Vec<(usize, String)> = Vec::new();
    let mut raw: Vec<(String, Vec<String>)> = Vec::new();
    let mut blocks: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut in_fence = false;
    let heading_path = |path: &[(usize, String)]| {
        std::iter::once(title.to_string())
            .chain(path.iter().map(|(_, h)| h.clone()))
            .collect::<Vec<_>>()
            .join(HEADING_SEPARATOR)
    };
    let end_block = |current: &mut String, blocks: &mut Vec<String>| {
        let block = std::mem::take(current);
        if block.trim().is_empty() {
            return;
        }
        // A list's items, or a paragraph inside a list, join the list.
        match blocks.last_mut() {
            Some(last) if continues_list(&block) && continues_list(last) => {
                last.push_str("\n\n");
                last.push_str(block.trim_end());
            }
            _ => blocks.push(block.trim_end().to_string()),
        }
    };
    for line in markdown.lines() {
        if in_fence {
            current.push_str(line);
            current.push('\n');
            if is_fence(line) {
                in_fence = false;
            }
            continue;
        }
        if is_fence(line) {
            in_fence = true;
            current.push_str(line);
            current.push('\n');
            continue;
        }
        if let Some((level, text)) = heading_of(line) {
            end_block(&mut current, &mut blocks);
            if !blocks.is_empty() {
                raw.push((heading_path(&path), std::mem::take(&mut blocks)));
            }
            if level == 1 && raw.is_empty() && path.is_empty() && text == title {
                continue;
            }
            path.retain(|(l, _)| *l < level);
            if !text.is_empty() {
                path.push((level, text.to_string()));
            }
            continue;
        }
        if line.trim().is_empty() {
            end_block(&mut current, &mut blocks);
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    end_block(&mut current, &mut blocks);
    if !blocks.is_empty() {
        raw.push((heading_path(&path), blocks));
    }
    let mut out = Vec::new();
    for (heading, blocks) in raw {
        let mut part: Vec<String> = Vec::new();
        let mut words = 0;
        for block in blocks {
            for piece in split_long_block(&block, max_words * MAX_BLOCK_FACTOR) {
                let n = piece.split_whitespace().count();
                if words > 0 && words + n > max_words {
                    out.push((heading.clone(), part.join("\n\n")));
                    part.clear();
                    words = 0;
                }
                part.push(piece);
                words += n;
            }
        }
        if !part.is_empty() {
            out.push((heading, part.join("\n\n")));
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(ordinal, (heading, text))| Section {
            ordinal,
            heading,
            text,
        })
        .collect()
}

/// A block within `limit` words is one piece; a longer one is cut between
/// lines (a single longer line between words).
fn split_long_block(block: &str, limit: usize) -> Vec<String> {
    if block.split_whitespace().count() <= limit {
        return vec![block.to_string()];
    }
    let mut pieces = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut words = 0;
    for line in block.lines() {
        let n = line.split_whitespace().count();
        if n > limit {
            if !current.is_empty() {
                pieces.push(current.join("\n"));
                current.clear();
                words = 0;
            }
            let all: Vec<&str> = line.split_whitespace().collect();
            pieces.extend(all.chunks(limit).map(|c| c.join(" ")));
            continue;
        }
        if words + n > limit && !current.is_empty() {
            pieces.push(current.join("\n"));
            current.clear();
            words = 0;
        }
        current.push(line);
        words += n;
    }
    if !current.is_empty() {
        pieces.push(current.join("\n"));
    }
    pieces
}

/// The constant of reciprocal rank fusion (Cormack et al.): a result's
/// fused score is the sum over rankings of 1 / (k + rank), rank from 1.
pub const RRF_K: f64 = 60.0;

/// Fuses rankings (each best first) into one, best first; ties keep the
/// order in which an id was first seen.
pub fn reciprocal_rank_fusion<'a>(rankings: &[&'a [String]], k: f64) -> Vec<(&'a str, f64)> {
    let weighted: Vec<(&[String], f64)> = rankings.iter().map(|r| (*r, 1.0)).collect();
    weighted_reciprocal_rank_fusion(&weighted, k)
}

/// As [`reciprocal_rank_fusion`], each ranking's terms multiplied by its
/// weight.
pub fn weighted_reciprocal_rank_fusion<'a>(
    rankings: &[(&'a [String], f64)],
    k: f64,
) -> Vec<(&'a str, f64)> {
    let mut scores: HashMap<&str, (f64, usize)> = HashMap::new();
    let mut seen = 0;
    for (ranking, weight) in rankings {
        let mut counted = std::collections::HashSet::new();
        for (i, id) in ranking.iter().enumerate() {
            if !counted.insert(id.as_str()) {
                continue;
            }
            let entry = scores.entry(id.as_str()).or_insert_with(|| {
                seen += 1;
                (0.0, seen)
            });
            entry.0 += weight / (k + (i + 1) as f64);
        }
    }
    let mut fused: Vec<(&str, f64, usize)> =
        scores.into_iter().map(|(id, (s, o))| (id, s, o)).collect();
    fused.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)));
    fused.into_iter().map(|(id, s, _)| (id, s)).collect()
}

/// One question of an evaluation set: which split it belongs to, the
/// article that answers it (None: none does, it is a knowledge gap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalQuestion {
    pub split: EvalSplit,
    pub expected: Option<String>,
    pub question: String,
}

/// Thresholds are tuned on one split, figures reported on the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalSplit {
    Tune,
    Report,
}

/// Reads an evaluation set: lines `split<TAB>expected<TAB>question`
/// (`expected` is a document id or `-`); `#` lines are comments. Bounded:
/// at most 10,000 questions of at most 2,000 characters.
pub fn parse_eval(text: &str) -> Result<Vec<EvalQuestion>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.splitn(3, '\t');
        let (Some(split), Some(expected), Some(question)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(format!(
                "line {}: expected three tab-separated fields",
                i + 1
            ));
        };
        let split = match split {
            "tune" => EvalSplit::Tune,
            "report" => EvalSplit::Report,
            other => return Err(format!("line {}: unknown split {other:?}", i + 1)),
        };
        let question = question.trim();
        if question.is_empty() || question.chars().count() > 2_000 {
            return Err(format!(
                "line {}: a question of 1 to 2,000 characters",
                i + 1
            ));
        }
        out.push(EvalQuestion {
            split,
            expected: Some(expected.trim())
                .filter(|e| *e != "-" && !e.is_empty())
                .map(str::to_string),
            question: question.to_string(),
        });
        if out.len() > 10_000 {
            return Err("more than 10,000 questions".into());
        }
    }
    Ok(out)
}

/// What retrieval returned for one question: the documents of the ranked
/// passages (best first, repeats allowed) and the best similarity.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub expected: Option<String>,
    pub ranked_documents: Vec<String>,
    pub top_similarity: f64,
}

/// Retrieval figures at a relevance threshold. A question whose best
/// similarity is under the threshold is called a knowledge gap (and is a
/// miss for hit@k and MRR when it has an answer).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RetrievalScores {
    pub questions: usize,
    pub answerable: usize,
    pub unanswerable: usize,
    pub hit_at_1: f64,
    pub hit_at_3: f64,
    pub mrr: f64,
    pub gap_precision: f64,
    pub gap_recall: f64,
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

pub fn retrieval_scores(judged: &[Judged], threshold: f64) -> RetrievalScores {
    let (mut hit1, mut hit3, mut rr) = (0usize, 0usize, 0.0);
    let (mut gaps_called, mut gaps_right) = (0usize, 0usize);
    let answerable = judged.iter().filter(|j| j.expected.is_some()).count();
    for j in judged {
        let gap = j.top_similarity < threshold;
        if gap {
            gaps_called += 1;
            gaps_right += usize::from(j.expected.is_none());
        }
        let Some(expected) = &j.expected else {
            continue;
        };
        if gap {
            continue;
        }
        let mut documents: Vec<&str> = Vec::new();
        for d in &j.ranked_documents {
            if !documents.contains(&d.as_str()) {
                documents.push(d);
            }
        }
        if let Some(rank) = documents.iter().position(|d| d == expected) {
            hit1 += usize::from(rank == 0);
            hit3 += usize::from(rank < 3);
            rr += 1.0 / (rank + 1) as f64;
        }
    }
    let unanswerable = judged.len() - answerable;
    RetrievalScores {
        questions: judged.len(),
        answerable,
        unanswerable,
        hit_at_1: ratio(hit1, answerable),
        hit_at_3: ratio(hit3, answerable),
        mrr: if answerable == 0 {
            0.0
        } else {
            rr / answerable as f64
        },
        gap_precision: ratio(gaps_right, gaps_called),
        gap_recall: ratio(gaps_right, unanswerable),
    }
}

/// The relevance threshold that best separates answerable questions from
/// gaps on `judged`: the best similarity of some question, maximising the
/// mean of gap recall and the share of answerable questions kept (ties: the
/// lower threshold, which answers more).
pub fn calibrate_threshold(judged: &[Judged]) -> f64 {
    let answerable = judged.iter().filter(|j| j.expected.is_some()).count();
    let unanswerable = judged.len() - answerable;
    let mut candidates: Vec<f64> = judged.iter().map(|j| j.top_similarity).collect();
    candidates.sort_by(f64::total_cmp);
    let mut best = (f64::MIN, 0.0);
    for t in candidates {
        let kept = judged
            .iter()
            .filter(|j| j.expected.is_some() && j.top_similarity >= t)
            .count();
        let gaps = judged
            .iter()
            .filter(|j| j.expected.is_none() && j.top_similarity < t)
            .count();
        let score = (ratio(kept, answerable) + ratio(gaps, unanswerable)) / 2.0;
        if score > best.0 {
            best = (score, t);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(expected: Option<&str>, ranked: &[&str], top: f64) -> Judged {
        Judged {
            expected: expected.map(str::to_string),
            ranked_documents: ranked.iter().map(|s| s.to_string()).collect(),
            top_similarity: top,
        }
    }

    #[test]
    fn retrieval_is_scored_by_document_rank_and_gaps() {
        let set = [
            judged(Some("a"), &["a", "b"], 0.7),
            judged(Some("a"), &["b", "b", "c", "a"], 0.6), // a is third distinct
            judged(Some("a"), &["a"], 0.3),                // under the line: a gap, a miss
            judged(None, &["b"], 0.2),                     // a gap, rightly
            judged(None, &["c"], 0.5),                     // answered wrongly
        ];
        let s = retrieval_scores(&set, 0.4);
        assert_eq!((s.questions, s.answerable, s.unanswerable), (5, 3, 2));
        assert!((s.hit_at_1 - 1.0 / 3.0).abs() < 1e-9);
        assert!((s.hit_at_3 - 2.0 / 3.0).abs() < 1e-9);
        assert!((s.mrr - (1.0 + 1.0 / 3.0) / 3.0).abs() < 1e-9);
        assert!((s.gap_precision - 0.5).abs() < 1e-9);
        assert!((s.gap_recall - 0.5).abs() < 1e-9);
    }

    #[test]
    fn the_threshold_is_calibrated_between_answers_and_gaps() {
        let set = [
            judged(Some("a"), &["a"], 0.62),
            judged(Some("a"), &["a"], 0.48),
            judged(None, &["a"], 0.41),
            judged(None, &["a"], 0.2),
        ];
        assert_eq!(calibrate_threshold(&set), 0.48);
    }

    #[test]
    fn the_eval_file_is_read_strictly() {
        let set =
            parse_eval("# c\ntune\t15-export\tHow do I export?\nreport\t-\tWeather?\n").unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set[0].expected.as_deref(), Some("15-export"));
        assert_eq!(set[1].split, EvalSplit::Report);
        assert_eq!(set[1].expected, None);
        assert!(parse_eval("train\t-\tq").is_err());
        assert!(parse_eval("tune\t-").is_err());
    }

    #[test]
    fn the_repository_eval_set_is_big_enough_and_names_real_articles() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let text = std::fs::read_to_string(root.join("kb/eval/questions.tsv")).unwrap();
        let set = parse_eval(&text).unwrap();
        let answerable = set.iter().filter(|q| q.expected.is_some()).count();
        assert!(answerable >= 150, "{answerable}");
        assert!(set.len() - answerable >= 30);
        for split in [EvalSplit::Tune, EvalSplit::Report] {
            assert!(set.iter().any(|q| q.split == split && q.expected.is_none()));
        }
        for q in &set {
            if let Some(doc) = &q.expected {
                assert!(root.join(format!("kb/demo/{doc}.md")).is_file(), "{doc}");
            }
        }
    }

    const EXPORT: &str = "# How do I export my project data?\n\nYou can export a project.\n\n## Export a project\n\n1. Open the project.\n2. Choose a format:\n   - **CSV**: one row per task.\n   - **JSON**: everything.\n3. Select **Start export**.\n\n## Errors\n\n### Export timed out\n\n```\n# not a heading\n```\n\nTry again.\n";

    #[test]
    fn sections_follow_the_headings_with_their_path() {
        let s = sections("How do I export my project data?", EXPORT, 200);
        let headings: Vec<&str> = s.iter().map(|s| s.heading.as_str()).collect();
        assert_eq!(
            headings,
            [
                "How do I export my project data?",
                "How do I export my project data? › Export a project",
                "How do I export my project data? › Errors › Export timed out",
            ]
        );
        assert_eq!(s[0].text, "You can export a project.");
        assert_eq!(
            s[1].text,
            "1. Open the project.\n2. Choose a format:\n   - **CSV**: one row per task.\n   - **JSON**: everything.\n3. Select **Start export**."
        );
        assert_eq!(s[2].text, "```\n# not a heading\n```\n\nTry again.");
        assert_eq!(s.iter().map(|s| s.ordinal).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(s[1].embedding_text().starts_with(
            "How do I export my project data? › Export a project\n1. Open the project."
        ));
    }

    #[test]
    fn a_long_section_is_cut_between_blocks_and_keeps_its_lists() {
        let list: String = (1..=8)
            .map(|i| format!("{i}. step number {i} of the list\n\n"))
            .collect();
        let para = "word ".repeat(30);
        let body = format!("## Long\n\n{para}\n\n{list}{para}");
        let s = sections("T", &body, 40);
        assert!(s.len() >= 3, "{s:#?}");
        for part in &s {
            assert_eq!(part.heading, "T › Long");
        }
        let with_list: Vec<&Section> = s.iter().filter(|p| p.text.contains("1. step")).collect();
        assert_eq!(with_list.len(), 1);
        assert!(
            with_list[0].text.contains("8. step number 8"),
            "the list stays whole"
        );
        let all: usize = s.iter().map(|p| p.text.split_whitespace().count()).sum();
        assert_eq!(
            all,
            body.split_whitespace().count() - 2,
            "only the heading is left out"
        );
    }

    #[test]
    fn an_absurd_block_is_still_bounded() {
        let body = "x ".repeat(10_000);
        let s = sections("T", &body, 50);
        assert!(s.iter().all(|p| p.text.split_whitespace().count() <= 200));
        assert_eq!(
            s.iter()
                .map(|p| p.text.split_whitespace().count())
                .sum::<usize>(),
            10_000
        );
    }

    #[test]
    fn rank_fusion_rewards_agreement() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let vector = ids(&["a", "b", "c"]);
        let text = ids(&["b", "d", "a"]);
        let fused = reciprocal_rank_fusion(&[&vector, &text], RRF_K);
        let order: Vec<&str> = fused.iter().map(|f| f.0).collect();
        // b: second and first; a: first and third; d: second; c: third.
        assert_eq!(order, ["b", "a", "d", "c"]);
        assert!((fused[0].1 - (1.0 / 62.0 + 1.0 / 61.0)).abs() < 1e-12);
        assert!((fused[3].1 - 1.0 / 63.0).abs() < 1e-12);
        // One ranking alone keeps its order; duplicates count once.
        let dup = ids(&["x", "x", "y"]);
        let alone = reciprocal_rank_fusion(&[&dup], RRF_K);
        assert_eq!(alone.iter().map(|f| f.0).collect::<Vec<_>>(), ["x", "y"]);
        assert!(reciprocal_rank_fusion(&[], RRF_K).is_empty());
        // A heavier ranking wins a tie of ranks.
        let (v, t) = (ids(&["a", "b"]), ids(&["b", "a"]));
        let fused = weighted_reciprocal_rank_fusion(&[(&v, 1.0), (&t, 1.1)], RRF_K);
        assert_eq!(fused[0].0, "b");
        assert!((fused[0].1 - (1.0 / 62.0 + 1.1 / 61.0)).abs() < 1e-12);
    }

    #[test]
    fn a_short_document_is_one_chunk_with_its_title() {
        let chunks = chunk(
            "Export",
            "# Export\n\nOpen Settings.\n\nPress Export.",
            50,
            10,
        );
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].text, "Export\nOpen Settings. Press Export.");
    }

    #[test]
    fn long_documents_overlap_and_respect_the_size() {
        let body: String = (0..300).map(|i| format!("w{i} ")).collect();
        let chunks = chunk("T", &body, 100, 20);
        assert!(chunks.len() >= 3);
        for c in &chunks {
            assert!(c.text.split_whitespace().count() <= 101);
        }
        let first: Vec<&str> = chunks[0].text.split_whitespace().collect();
        let second: Vec<&str> = chunks[1].text.split_whitespace().collect();
        assert_eq!(first[first.len() - 20..], second[1..21], "20 words shared");
        assert!(chunks.last().unwrap().text.contains("w299"));
    }

    #[test]
    fn titles_come_from_the_first_heading() {
        assert_eq!(
            title_of("\n# How do I export?\n\nText").as_deref(),
            Some("How do I export?")
        );
        assert_eq!(title_of("   \n"), None);
    }
}
