"""Reading blog posts (Markdown, HTML, RSS/Atom) into clean prose, and cutting it into passages."""
import shutil
import socket
from pathlib import Path

import pytest

from voicetune.core.errors import UserError
from voicetune.data.posts import (Passage, Post, PostsError, Problem, read_posts, source_files,
                             split_passages)

from tests.conftest import ROOT
SAMPLE = ROOT / "data" / "sample" / "posts"
SAMPLE_PASSAGES_AT_220 = 30  # the count the ingest stage will generate questions for


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Reading posts must never fetch anything (trafilatura and feedparser can)."""
    def refuse(*args, **kwargs):
        raise AssertionError("posts tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


PROSE = ("The tide turns whether you are ready or not, so be ready. "
         "Check the almanac the night before and write the times on the chart. ")

MARKDOWN = f"""---
title: Reef early
date: 2024-03-14
tags: [weather, reefing]
---
# Reef early

{PROSE}See [the forecast](https://example.org/forecast) and *never* **skip** `the log`.

## Code and tables

```python
print("secret fenced code")
```

    indented_secret_code()

| Knot | Use |
|------|-----|
| table_secret | loop |

![image_secret alt text](boat.png)

{PROSE}
"""

PAGE = f"""<!DOCTYPE html><html><head><meta charset="utf-8">
<title>Knots that hold | Brask Sailing School</title>
<meta property="og:title" content="Knots that hold">
<meta property="article:published_time" content="2024-06-10T08:30:00+02:00">
<meta property="article:tag" content="knots"><meta property="article:tag" content="rope">
</head><body>
<header><div class="logo">header_secret</div>
<nav><ul><li><a href="/">nav_home_secret</a></li><li><a href="/c">nav_courses_secret</a></li></ul></nav></header>
<main><article><h1>Knots that hold</h1>
<p>{PROSE * 2}</p>
<h2>The bowline</h2>
<p>{PROSE}The <a href="/b">bowline</a> makes a loop that will not slip.</p>
<pre><code>tie_secret(rope)</code></pre>
<table><tr><th>Knot</th><th>Use</th></tr><tr><td>table_secret</td><td>loop</td></tr></table>
<figure><img src="/b.jpg" alt="image_secret"><figcaption>caption_secret</figcaption></figure>
<p>{PROSE * 2}</p>
</article>
<aside class="sidebar"><h3>Upcoming courses</h3><p>sidebar_secret: book now.</p></aside></main>
<footer><p>footer_secret &copy; 2024</p></footer>
</body></html>
"""

RSS = f"""<?xml version="1.0" encoding="utf-8"?>
<rss version="2.0" xmlns:content="http://purl.org/rss/1.0/modules/content/"><channel>
<title>Captain's Log</title><link>https://brask.example/</link><description>d</description>
<item><title>Fog</title><link>https://brask.example/blog/fog/</link>
<pubDate>Thu, 12 Sep 2024 07:00:00 +0200</pubDate><category>fog</category><category>navigation</category>
<content:encoded><![CDATA[<p>{PROSE}</p><h2>Slow down</h2><p>{PROSE}</p><pre><code>code_secret()</code></pre>]]></content:encoded></item>
<item><title>Anchoring</title><guid isPermaLink="false">anchor-2024</guid>
<pubDate>Wed, 16 Oct 2024 18:30:00 +0200</pubDate>
<description>&lt;p&gt;{PROSE}&lt;/p&gt;</description></item>
</channel></rss>
"""

ATOM = f"""<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>Log</title><id>urn:log</id>
<updated>2024-11-01T00:00:00Z</updated>
<entry><title>Winter jobs</title><id>urn:uuid:winter-jobs</id>
<updated>2024-11-01T10:00:00Z</updated><category term="maintenance"/>
<content type="html">&lt;p&gt;{PROSE}&lt;/p&gt;</content></entry>
</feed>
"""


def by_id(posts):
    return {p.id: p for p in posts}


# --- formats --------------------------------------------------------------------------------

def test_markdown_front_matter_and_clean_prose(tmp_path):
    write(tmp_path / "blog" / "reef.md", MARKDOWN)
    posts, problems = read_posts(tmp_path)
    assert problems == []
    [post] = posts
    assert (post.id, post.source, post.title, post.date, post.tags) == (
        "blog/reef.md", "blog/reef.md", "Reef early", "2024-03-14", ["weather", "reefing"])
    # the leading "# Reef early" is the title, not a section; links and emphasis are plain text
    assert post.text.startswith("The tide turns")
    assert "See the forecast and never skip the log." in post.text
    assert "## Code and tables" in post.text.split("\n")
    for secret in ("secret fenced code", "indented_secret_code", "table_secret", "image_secret",
                   "https://", "**", "```"):
        assert secret not in post.text, secret


def test_markdown_keep_code_keeps_fenced_blocks(tmp_path):
    write(tmp_path / "reef.md", MARKDOWN)
    [post], _ = read_posts(tmp_path, keep_code=True)
    assert '```python\nprint("secret fenced code")\n```' in post.text
    assert "```\nindented_secret_code()\n```" in post.text
    assert "table_secret" not in post.text and "image_secret" not in post.text


def test_markdown_titles_fall_back_to_heading_then_file_name(tmp_path):
    write(tmp_path / "a.md", f"# Fog at sea\n\n{PROSE}\n")
    write(tmp_path / "b-night-watch.md", f"---\ndate: 2024-03-01T22:00:00Z\ntags: fog, night\n---\n{PROSE}\n")
    posts = by_id(read_posts(tmp_path)[0])
    assert posts["a.md"].title == "Fog at sea" and posts["a.md"].text == PROSE.strip()
    b = posts["b-night-watch.md"]
    assert (b.title, b.date, b.tags) == ("b night watch", "2024-03-01", ["fog", "night"])


def test_html_main_text_without_chrome(tmp_path):
    write(tmp_path / "knots.html", PAGE)
    [post], problems = read_posts(tmp_path)
    assert problems == []
    assert (post.id, post.title, post.date, post.tags) == (
        "knots.html", "Knots that hold", "2024-06-10", ["knots", "rope"])
    assert "## The bowline" in post.text.split("\n")
    assert "The bowline makes a loop that will not slip." in post.text
    for secret in ("header_secret", "nav_home_secret", "nav_courses_secret", "tie_secret",
                   "table_secret", "image_secret", "caption_secret", "sidebar_secret",
                   "footer_secret", "Upcoming courses"):
        assert secret not in post.text, secret
    [kept], _ = read_posts(tmp_path, keep_code=True)
    assert "```\ntie_secret(rope)\n```" in kept.text and "table_secret" not in kept.text


def test_html_bare_pre_is_code_not_prose(tmp_path):
    write(tmp_path / "p.htm", PAGE.replace("<pre><code>tie_secret(rope)</code></pre>",
                                           "<pre>tie_secret(rope)</pre>"))
    [post], _ = read_posts(tmp_path)
    assert "tie_secret" not in post.text


def test_feeds_give_one_post_per_entry(tmp_path):
    write(tmp_path / "feed.xml", RSS)
    write(tmp_path / "log.atom", ATOM)
    posts, problems = read_posts(tmp_path)
    assert problems == []
    assert [p.id for p in posts] == ["feed.xml#fog", "feed.xml#anchor-2024", "log.atom#winter-jobs"]
    fog, anchor, winter = posts
    assert (fog.title, fog.date, fog.tags, fog.source) == ("Fog", "2024-09-12", ["fog", "navigation"], "feed.xml")
    assert fog.text == f"{PROSE.strip()}\n\n## Slow down\n\n{PROSE.strip()}"
    assert (anchor.title, anchor.date, anchor.tags, anchor.text) == ("Anchoring", "2024-10-16", [], PROSE.strip())
    assert (winter.title, winter.date, winter.tags) == ("Winter jobs", "2024-11-01", ["maintenance"])
    [kept, *_], _ = read_posts(tmp_path, keep_code=True)
    assert "```\ncode_secret()\n```" in kept.text


def test_single_file_source_and_ignored_files(tmp_path):
    write(tmp_path / "feed.rss", RSS)
    write(tmp_path / "notes.txt", "not a post")
    write(tmp_path / "img" / "boat.png", b"\x89PNG\r\n")
    write(tmp_path / ".git" / "HEAD", "ref: main")
    write(tmp_path / "sub" / ".draft.md.swp", b"\x00\xff")
    posts, problems = read_posts(tmp_path / "feed.rss")
    assert [p.id for p in posts] == ["feed.rss#fog", "feed.rss#anchor-2024"] and problems == []
    folder, found, ignored = source_files(tmp_path)
    assert folder == tmp_path and found == [tmp_path / "feed.rss"]
    assert [p.relative_to(tmp_path).as_posix() for p in ignored] == ["img/boat.png", "notes.txt"]
    assert len(read_posts(tmp_path)[0]) == 2


# --- passages -------------------------------------------------------------------------------

def words(text: str) -> list[str]:
    return text.split()


def long_post() -> Post:
    sentence = "The wind backed south and the glass fell three millibars in an hour. "
    text = "\n\n".join([
        "Intro paragraph about tides and the sea.",
        "## Long section",
        sentence * 30,                                   # one over-long paragraph (390 words)
        "A short paragraph.",
        "- first rule of thumb\n- second rule of thumb",
        "### Run-on",
        "word " * 130,                                   # one over-long sentence
        "## Tail",
        sentence * 8,
        "Tiny tail.",
    ])
    return Post("log/long.md", "A long post", None, [], "log/long.md", text)


def test_passages_fit_and_cover_the_text_in_order():
    post = long_post()
    passages = split_passages(post, max_words=50, min_words=10)
    assert all(isinstance(p, Passage) and p.post_id == post.id for p in passages)
    assert [p.id for p in passages] == [f"log/long.md#p{n}" for n in range(1, len(passages) + 1)]
    assert all(len(words(p.text)) <= 50 for p in passages)
    prose = [line for line in post.text.split("\n") if not line.startswith("#")]
    assert [w for p in passages for w in words(p.text)] == words("\n".join(prose))
    assert passages[0].heading is None
    assert {p.heading for p in passages} == {None, "Long section", "Run-on", "Tail"}
    # over-long paragraphs were cut between sentences
    assert all(p.text.endswith((".", "hour.", "word", "thumb")) for p in passages)


def test_tiny_trailing_piece_joins_the_previous_passage():
    sentence = "Slow down in fog and listen hard. "
    post = Post("f.md", "Fog", None, [], "f.md", "## Fog\n\n" + sentence * 6 + "\n\nTiny tail here.")
    [only] = split_passages(post, max_words=60, min_words=10)
    assert only.text.endswith("Tiny tail here.") and only.heading == "Fog"
    # when it does not fit, the passage before gives it paragraphs until it is big enough
    paras = [sentence.strip()] * 6 + ["Tiny tail here."]
    post = Post("f.md", "Fog", None, [], "f.md", "\n\n".join(paras))
    passages = split_passages(post, max_words=30, min_words=10)
    assert all(len(words(p.text)) >= 10 for p in passages)
    assert all(len(words(p.text)) <= 30 for p in passages)


def test_passages_keep_code_blocks_whole():
    code = "```python\ndef f():\n\n    # a comment, not a heading\n    return 1\n```"
    post = Post("c.md", "Code", None, [], "c.md", f"## Example\n\nSome prose here.\n\n{code}")
    [p] = split_passages(post, max_words=100)
    assert p.text == f"Some prose here.\n\n{code}" and p.heading == "Example"


def test_passages_are_stable_and_hashes_change_only_for_the_edited_post(tmp_path):
    corpus = tmp_path / "posts"
    shutil.copytree(SAMPLE, corpus)

    def passages():
        return {p.id: p for post in read_posts(corpus)[0] for p in split_passages(post, 220)}

    before = passages()
    assert passages() == before
    edited = corpus / "2024-02-20-man-overboard.md"
    edited.write_text(edited.read_text().replace("Bob has been rescued", "Bob has been saved"))
    after = passages()
    assert after.keys() == before.keys()
    changed = {pid for pid in before if before[pid].sha256 != after[pid].sha256}
    assert changed and all(pid.startswith("2024-02-20-man-overboard.md#") for pid in changed)
    assert len(changed) == 1
    # the hash covers what a generator sees: the post title and the heading too
    p = next(iter(before.values()))
    post = Post(p.post_id, "Another title", None, [], p.post_id, p.text)
    assert split_passages(post, 220)[0].sha256 != p.sha256


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_words"):
        split_passages(long_post(), max_words=0)


# --- bad input ------------------------------------------------------------------------------

def bad_corpus(tmp_path: Path) -> Path:
    """One good post and one of every kind of bad input."""
    src = tmp_path / "src"
    write(src / "good.md", f"---\ntitle: Good\n---\n{PROSE}\n")
    write(src / "latin1.md", f"# Caf\xe9\n\n{PROSE}".encode("latin-1"))
    write(src / "broken-yaml.md", f"---\ntitle: [unclosed\n---\n{PROSE}\n")
    write(src / "unclosed.md", f"---\ntitle: Open\n{PROSE}\n")
    write(src / "list-yaml.md", f"---\n- a\n- b\n---\n{PROSE}\n")
    write(src / "bad-date.md", f"---\ndate: last tuesday\n---\n{PROSE}\n")
    write(src / "bad-tags.md", f"---\ntags: {{a: 1}}\n---\n{PROSE}\n")
    write(src / "only-code.md", "# Title\n\n```\ncode only\n```\n\n![pic](x.png)\n")
    write(src / "empty.html", "<html><body><nav><a href='/'>Home</a></nav></body></html>")
    write(src / "broken.xml", "<rss><channel><title>cut sh")
    write(src / "sitemap.xml", '<?xml version="1.0"?><urlset><url><loc>x</loc></url></urlset>')
    write(src / "latin1-feed.rss", RSS.replace("Fog</title>", "Caf\xe9</title>").encode("latin-1"))
    write(src / "dupes.atom", ATOM.replace("</feed>", ATOM.split("<updated>2024-11-01T00:00:00Z</updated>")[1]))
    (src / "gone.md").symlink_to(src / "nowhere.md")
    return src


EXPECTED_PROBLEMS = {
    "latin1.md": "not UTF-8 (byte 0xe9 on line 1); save the file as UTF-8",
    "broken-yaml.md": "malformed YAML front matter",
    "unclosed.md": "front matter opened with '---' is never closed",
    "list-yaml.md": "front matter is a list, not a mapping",
    "bad-date.md": "'last tuesday' is not an ISO 8601 date; write it as YYYY-MM-DD",
    "bad-tags.md": "front matter 'tags' must be a list",
    "only-code.md": "no prose left after removing code",
    "empty.html": "trafilatura found no main text",
    "broken.xml": "not a readable RSS/Atom feed",
    "sitemap.xml": "feed has no entries",
    "latin1-feed.rss": "encoding problem",
    "dupes.atom": "duplicate post id 'dupes.atom#winter-jobs'",
    "gone.md": "cannot read the file",
}


def test_every_bad_input_is_reported_with_its_file_and_skipped(tmp_path):
    posts, problems = read_posts(bad_corpus(tmp_path))
    assert [p.id for p in posts] == ["dupes.atom#winter-jobs", "good.md"]
    assert all(isinstance(p, Problem) and "\n" not in p.reason for p in problems)
    assert sorted(p.path for p in problems) == sorted(EXPECTED_PROBLEMS)
    for problem in problems:
        assert EXPECTED_PROBLEMS[problem.path] in problem.reason, problem


def test_refuse_lists_every_problem_at_once(tmp_path):
    src = bad_corpus(tmp_path)
    with pytest.raises(PostsError) as err:
        read_posts(src, on_error="refuse")
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
    message = str(err.value)
    assert f"cannot read the posts in {src} ({len(EXPECTED_PROBLEMS)} problems):" in message
    for path, reason in EXPECTED_PROBLEMS.items():
        assert f"\n  {path}: " in message and reason in message
    assert len(err.value.problems) == len(EXPECTED_PROBLEMS)


def test_bad_feed_entry_is_skipped_alone(tmp_path):
    write(tmp_path / "feed.xml", RSS.replace(f"&lt;p&gt;{PROSE}&lt;/p&gt;", "&lt;img src='x.png'&gt;"))
    posts, [problem] = read_posts(tmp_path)
    assert [p.id for p in posts] == ["feed.xml#fog"]
    assert problem.path == "feed.xml" and problem.reason.startswith("entry 2 (anchor-2024): no prose")
    # in a feed cut short, the entry's problem points at the XML
    write(tmp_path / "feed.xml", RSS[:RSS.index("<description>&lt;p&gt;")])
    _, [problem] = read_posts(tmp_path)
    assert "no prose" in problem.reason and "the feed's XML is malformed" in problem.reason


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing", "missing: no such file or folder"),
    (lambda d: write(d / "notes.txt", "x"), "notes.txt: not a post or feed file"),
    (lambda d: write(d / "empty" / "readme.txt", "x").parent, "no posts found"),
    (lambda d: write(d / "only-bad" / "x.md", b"\xff").parent, "x.md: not UTF-8"),
])
def test_source_errors_are_clear(tmp_path, make, expected):
    with pytest.raises(PostsError, match=expected):
        read_posts(make(tmp_path))


def test_unknown_on_error_is_refused(tmp_path):
    with pytest.raises(PostsError, match="expected 'skip' or 'refuse'"):
        read_posts(SAMPLE, on_error="ignore")


# --- the sample corpus ----------------------------------------------------------------------

def test_sample_corpus_reads_cleanly():
    posts, problems = read_posts(SAMPLE, on_error="refuse")
    assert problems == []
    assert len(posts) == 8 and len({p.id for p in posts}) == 8
    kinds = [Path(p.source).suffix for p in posts]
    assert (kinds.count(".md"), kinds.count(".html"), kinds.count(".xml")) == (4, 2, 2)
    for post in posts:
        assert post.title and post.date and post.tags
        assert 250 <= len(post.text.split()) <= 700, post.id
        assert sum(line.startswith("## ") for line in post.text.split("\n")) >= 2, post.id
        for chrome in ("Brask Sailing School", "Upcoming courses", "All rights reserved",
                       "Share this post", "cookies", "def height_after", "Which knot for which job",
                       "| Fall in 3 hours", "Posted by"):
            assert chrome not in post.text, (post.id, chrome)
    passages = [p for post in posts for p in split_passages(post, max_words=220)]
    assert len(passages) == SAMPLE_PASSAGES_AT_220
    assert all(len(p.text.split()) <= 220 for p in passages)
    assert len({p.sha256 for p in passages}) == len(passages)
