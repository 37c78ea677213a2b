"""Blog posts as clean prose, and prose as passages: the input of the ``ingest`` stage.

``read_posts`` reads a folder (recursively, in sorted order) or a single file of
    .md / .markdown  front matter (python-frontmatter): title, date, tags; body via markdown-it
    .html / .htm     the main text and metadata extracted by trafilatura (no chrome)
    .xml / .rss / .atom  an RSS or Atom feed (feedparser), one post per entry
and returns one ``Post`` per file or feed entry. Its ``text`` is prose only: paragraphs
separated by a blank line, headings as "# ", "## ", ... lines, lists as "- " lines; code
blocks, tables, images, navigation, headers, footers and sidebars are left out (code is kept
as fenced blocks with ``keep_code=True``). Every file that cannot be used becomes a
``Problem`` that says what is wrong and how to fix it, and is skipped (``on_error="skip"``)
or stops the reading (``on_error="refuse"``: one ``PostsError`` listing all of them).

Nothing here touches the network: trafilatura and feedparser get the files' contents, never
a URL.

``split_passages`` cuts a post into passages of at most ``max_words`` words: on headings
first, then between paragraphs, an over-long paragraph between sentences. Each passage has
a stable id (``<post id>#p<n>``) and a sha256 of what a question generator sees for it (post
title, heading, text), so that a cache keyed on it survives edits to other posts.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import html
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from voicetune.core.errors import UserError

MARKDOWN = (".md", ".markdown")
HTML = (".html", ".htm")
FEEDS = (".xml", ".rss", ".atom")
SUPPORTED = MARKDOWN + HTML + FEEDS
BOM = b"\xef\xbb\xbf"
SAMPLE = "data/sample/posts"  # the sample posts, in the repository: one of each kind read here


def to_create(source: str) -> str:
    """What to make of a posts source that does not exist yet, with the sample as the example."""
    if Path(source).suffix.lower() in SUPPORTED:
        what = f"{source} does not exist yet: put your blog's feed export or post there"
    else:
        what = (f"{source}/ does not exist yet: create it and put your posts in it (Markdown "
                "with front matter, saved HTML pages, RSS/Atom feed exports; subfolders are read too)")
    return (f"{what}. {SAMPLE}/ holds an example of each kind; `cp -r {SAMPLE} {source}` tries the "
            f"pipeline on them. Until it exists, `dvc repro` stops: {source} is a dependency of "
            "the ingest stage")


@dataclass(frozen=True)
class Post:
    id: str           # path relative to the source folder (POSIX); "<feed path>#<slug>" for an entry
    title: str
    date: str | None  # ISO 8601 date (YYYY-MM-DD) if known
    tags: list[str]
    source: str       # the file it came from, relative to the source folder
    text: str         # paragraphs separated by a blank line; headings as "#"-prefixed lines


@dataclass(frozen=True)
class Passage:
    post_id: str
    id: str               # f"{post_id}#p{n}", n from 1
    heading: str | None   # the nearest heading above it
    text: str
    sha256: str           # of (post title, heading, text): what a generator sees; the cache key


@dataclass(frozen=True)
class Problem:
    path: str    # relative to the source folder
    reason: str  # one line: what is wrong and how to fix it

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class PostsError(UserError, ValueError):
    """Posts that cannot be read; the message lists every problem, one per line."""

    def __init__(self, problems: list[Problem], header: str):
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(f"{header} ({n} problem{'s' * (n != 1)}):\n  "
                         + "\n  ".join(map(str, self.problems)))


class _Skip(Exception):
    """One file (or feed entry) cannot be used; ``reason`` says why and how to fix it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# finding and decoding files

def source_files(source: str | Path) -> tuple[Path, list[Path], list[Path]]:
    """The source folder, the post/feed files in it (sorted by relative POSIX path), and the
    other files, which ``read_posts`` ignores (for the caller to count). Hidden files and
    folders (``.git``, editor swap files) are neither. ``source`` may be a single file."""
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() not in SUPPORTED:
            raise PostsError([Problem(str(source), "not a post or feed file; expected a folder or "
                                      f"a file ending in {', '.join(SUPPORTED)}")],
                             header="cannot read posts")
        return source.parent, [source], []
    if not source.exists():
        raise PostsError([Problem(str(source), "no such file or folder; check the path "
                                  "(relative paths are from the project root)")],
                         header="cannot read posts")
    if not source.is_dir():
        raise PostsError([Problem(str(source), "neither a folder nor a regular file")],
                         header="cannot read posts")
    found, ignored = [], []
    for path in sorted(source.rglob("*"), key=lambda p: p.relative_to(source).as_posix()):
        rel = path.relative_to(source)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir():
            continue
        # a dangling link to a post file is kept: reading it reports the problem
        (found if path.suffix.lower() in SUPPORTED else ignored).append(path)
    return source, found, ignored


def _decode(data: bytes) -> str:
    """UTF-8 text (a leading BOM dropped); anything else is reported, never guessed."""
    if data.startswith(BOM):
        data = data[len(BOM):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise _Skip(f"not UTF-8 (byte 0x{data[err.start]:02x} on line {line}); "
                    "save the file as UTF-8")


# ---------------------------------------------------------------------------------------------
# HTML trees -> blocks -> text
#
# Markdown (through markdown-it's HTML), feed entries' HTML and trafilatura's XML output are
# all trees; one walker turns a tree into blocks: ("h", level, text), ("p", text) and
# ("code", language, text). Only the element names differ between HTML and trafilatura's XML.

@dataclass(frozen=True)
class _Vocab:
    headings: dict          # tag -> level (None: read the level from rend="h2")
    lists: frozenset
    item: str
    code: frozenset         # block-level code
    paragraphs: frozenset
    containers: frozenset   # blocks whose children are blocks (text directly in them is prose)
    skip: frozenset         # dropped with their content (their tail text is kept)
    line_break: frozenset


_HTML = _Vocab(
    headings={f"h{i}": i for i in range(1, 7)},
    lists=frozenset({"ul", "ol"}), item="li", code=frozenset({"pre"}),
    paragraphs=frozenset({"p", "dt", "dd", "summary", "address"}),
    containers=frozenset({"div", "section", "article", "main", "blockquote", "details", "body",
                          "html", "dl", "center", "hgroup"}),
    skip=frozenset({"table", "img", "figure", "picture", "svg", "video", "audio", "iframe",
                    "object", "embed", "script", "style", "noscript", "template", "nav",
                    "header", "footer", "aside", "form", "button", "input", "select",
                    "textarea", "canvas", "map", "math", "hr", "head", "title", "meta", "link"}),
    line_break=frozenset({"br"}),
)
_TRAFILATURA = _Vocab(
    headings={"head": None},
    lists=frozenset({"list"}), item="item", code=frozenset({"code"}),
    paragraphs=frozenset({"p"}),
    containers=frozenset({"doc", "main", "div", "quote"}),
    skip=frozenset({"table", "graphic", "comments", "figure"}),
    line_break=frozenset({"lb"}),
)


def _tag(el) -> str | None:
    return el.tag.lower() if isinstance(el.tag, str) else None  # None: comment, PI


def _squash(text: str) -> str:
    return " ".join(text.split())


def _inline(el, vocab: _Vocab, exclude: frozenset = frozenset()) -> str:
    """The text of an element as running prose: markup dropped, images and the like skipped."""
    out = [el.text or ""]
    for child in el:
        tag = _tag(child)
        if tag in vocab.line_break:
            out.append(" ")
        elif tag is not None and tag not in vocab.skip and tag not in exclude:
            out.append(_inline(child, vocab, exclude))
        out.append(child.tail or "")
    return "".join(out)


def _code_block(el) -> tuple:
    lang = None
    for node in (el, *el):  # <pre><code class="language-python">, as markdown-it writes it
        for cls in (node.get("class") or "").split():
            if cls.startswith("language-"):
                lang = cls.removeprefix("language-")
    return ("code", lang, "".join(el.itertext()).strip("\n"))


def _list_lines(el, vocab: _Vocab, depth: int = 0) -> list[str]:
    ordered = el.get("rend") == "ol" or _tag(el) == "ol"
    number = int(el.get("start") or 1) if (el.get("start") or "").isdigit() else 1
    lines = []
    for item in el:
        if _tag(item) != vocab.item:
            continue
        # a <pre> inside an item is no prose either (tables and images are skipped anyway);
        # trafilatura writes inline code and code blocks alike as <code>, and inline code is
        # part of the sentence, so there it stays
        code = vocab.code if vocab is _HTML else frozenset()
        text = _squash(_inline(item, vocab, exclude=vocab.lists | code))
        if text:
            marker = f"{number}." if ordered else "-"
            lines.append(f"{'  ' * depth}{marker} {text}")
            number += 1
        for sub in item:  # nested lists, one level deeper
            if _tag(sub) in vocab.lists:
                lines += _list_lines(sub, vocab, depth + 1)
    return lines


def _blocks(root, vocab: _Vocab) -> list[tuple]:
    """The blocks of a tree in document order."""
    blocks: list[tuple] = []
    pending: list[str] = []  # loose inline text directly in a container

    def flush():
        text = _squash("".join(pending))
        if text:
            blocks.append(("p", text))
        pending.clear()

    def walk(el):
        pending.append(el.text or "")
        for child in el:
            tag = _tag(child)
            if tag is None or tag in vocab.skip:
                pass
            elif tag in vocab.headings:
                flush()
                level = vocab.headings[tag]
                if level is None:  # trafilatura: <head rend="h3">
                    rend = child.get("rend") or "h2"
                    level = int(rend[1]) if re.fullmatch(r"h[1-6]", rend) else 2
                text = _squash(_inline(child, vocab))
                if text:
                    blocks.append(("h", level, text))
            elif tag in vocab.paragraphs:
                flush()
                pending.append(_inline(child, vocab))
                flush()
            elif tag in vocab.lists:
                flush()
                lines = _list_lines(child, vocab)
                if lines:
                    blocks.append(("p", "\n".join(lines)))
            elif tag in vocab.code:
                flush()
                block = _code_block(child)
                if block[2].strip():
                    blocks.append(block)
            elif tag in vocab.containers:
                flush()
                walk(child)
                flush()
            else:  # inline element (a, em, code, span, ...) loose in a container
                pending.append(_inline(child, vocab))
            pending.append(child.tail or "")
        # the caller flushes

    walk(root)
    flush()
    return blocks


def _render(blocks: list[tuple], keep_code: bool) -> str:
    parts = []
    for block in blocks:
        if block[0] == "h":
            parts.append(f"{'#' * block[1]} {block[2]}")
        elif block[0] == "p":
            parts.append(block[1])
        elif keep_code:
            _, lang, code = block
            # a fence longer than any run of backticks inside keeps the block in one piece
            fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", code)), default=0))
            parts.append(f"{fence}{lang or ''}\n{code}\n{fence}")
    return "\n\n".join(parts)


def _html_blocks(fragment: str) -> list[tuple]:
    """Blocks of an HTML fragment that is all content (Markdown's HTML, a feed entry's)."""
    import lxml.html
    from lxml.etree import ParserError

    if not fragment.strip():
        return []
    try:
        root = lxml.html.fragment_fromstring(fragment, create_parent="div")
    except (ParserError, ValueError):
        return []
    return _blocks(root, _HTML)


def _post(blocks: list[tuple], title: str | None, fallback_title: str, keep_code: bool
          ) -> tuple[str, str]:
    """The post's title and text; a leading heading that repeats the title is dropped."""
    first_heading = next((b[2] for b in blocks if b[0] == "h"), None)
    title = (title or "").strip() or first_heading or fallback_title
    if blocks and blocks[0][0] == "h" and _squash(blocks[0][2]).casefold() == _squash(title).casefold():
        blocks = blocks[1:]
    if not any(b[0] == "p" and re.search(r"\w", b[1]) for b in blocks):
        raise _Skip("no prose left after removing code, tables, images and page chrome; add "
                    "text to the post or move the file out of the source folder")
    return _squash(title), _render(blocks, keep_code)


def _iso_date(value, where: str) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value.strip()).date().isoformat()
        except ValueError:
            pass
    raise _Skip(f"{where}: {value!r} is not an ISO 8601 date; write it as YYYY-MM-DD "
                "(e.g. 2024-03-14)")


def _tag_list(values) -> list[str]:
    """Tags in order, without duplicates; comma-separated strings are split."""
    out: list[str] = []
    for value in values:
        for tag in str(value).split(","):
            tag = tag.strip()
            if tag and tag not in out:
                out.append(tag)
    return out


def _file_title(path: Path) -> str:
    return path.stem.replace("-", " ").replace("_", " ").strip() or path.name


# ---------------------------------------------------------------------------------------------
# the three formats

def _markdown(path: Path, rel: str, text: str, keep_code: bool) -> list[Post]:
    import frontmatter
    import yaml
    from markdown_it import MarkdownIt

    meta: object = {}
    handler = frontmatter.YAMLHandler()
    if handler.detect(text):
        try:
            raw, body = handler.split(text)
        except ValueError:
            raise _Skip("front matter opened with '---' is never closed; add a '---' line after "
                        "its last key")
        try:
            meta = handler.load(raw) if raw.strip() else {}
        except (yaml.YAMLError, ValueError) as err:
            where = getattr(err, "problem_mark", None)
            at = f" (line {where.line + 2} of the file)" if where is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise _Skip(f"malformed YAML front matter{at}: {problem}; fix the block between "
                        "the '---' lines")
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise _Skip(f"front matter is a {type(meta).__name__}, not a mapping; write it as "
                        "'key: value' lines (title:, date:, tags:)")
    else:
        body = text
    title = meta.get("title")
    if title is not None and not isinstance(title, (str, int, float)):
        raise _Skip(f"front matter 'title' must be text, got {type(title).__name__}")
    date = _iso_date(meta.get("date"), "front matter 'date'")
    tags = meta.get("tags") or []
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, list) or any(isinstance(t, (dict, list)) for t in tags):
        raise _Skip("front matter 'tags' must be a list of words (tags: [sailing, weather]) "
                    "or one comma-separated string")
    md = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    title, prose = _post(_html_blocks(md.render(body)), None if title is None else str(title),
                         _file_title(path), keep_code)
    return [Post(rel, title, date, _tag_list(tags), rel, prose)]


def _trafilatura_config():
    from trafilatura.settings import use_config

    config = use_config()
    # no SIGALRM-based timeout: it fails outside the main thread and makes results timing-dependent
    config.set("DEFAULT", "EXTRACTION_TIMEOUT", "0")
    return config


def _extract(tree) -> str | None:
    """The main text of a page as trafilatura's XML, its metadata as attributes of <doc>."""
    import trafilatura

    return trafilatura.extract(
        tree, output_format="xml", with_metadata=True, include_comments=False,
        include_tables=False, include_images=False, include_links=False,
        include_formatting=False, deduplicate=False, config=_trafilatura_config(),
        # precision over recall, and no fallback extractors: on a page with little text those
        # take the whole body, menus included, and chrome in the prose is worse than a lost line
        favor_precision=True, fast=True,
        # the page's own metadata only: no dates guessed from text, links or the file's age
        date_extraction_params={"extensive_search": False, "original_date": True})


def _html(path: Path, rel: str, text: str, keep_code: bool) -> list[Post]:
    import lxml.etree
    import lxml.html

    # its "discarding data" warnings would reach stderr; what matters comes back as a Problem
    logging.getLogger("trafilatura").setLevel(logging.ERROR)
    try:
        # bytes with the encoding stated: a page's own <meta charset> must not re-decode the
        # UTF-8 we checked (and lxml refuses str that starts with an XML declaration)
        tree = lxml.html.document_fromstring(text.encode("utf-8"),
                                             parser=lxml.html.HTMLParser(encoding="utf-8"))
    except (lxml.etree.ParserError, ValueError) as err:
        raise _Skip(f"not readable as HTML ({err}); check that the file is an HTML page")
    # trafilatura only knows a <pre> is code when it holds a <code>; a bare <pre> would come
    # back as a quotation and its code would land in the prose
    for pre in tree.iter("pre"):
        if pre.find("code") is None:
            code = lxml.html.Element("code")
            code.text, pre.text = pre.text, None
            for child in list(pre):
                code.append(child)
            pre.append(code)
    try:
        xml = _extract(tree)
    except Exception as err:  # a third-party parser on arbitrary pages: report, never crash
        raise _Skip(f"trafilatura could not read the page ({type(err).__name__}: {err}); check "
                    "the HTML or convert the post to Markdown")
    if not xml:
        raise _Skip("trafilatura found no main text in the page; make sure the article text "
                    "is in the HTML (not loaded by JavaScript) or convert it to Markdown")
    doc = lxml.etree.fromstring(xml)
    tags = _tag_list((doc.get("tags") or "").split(";") + (doc.get("categories") or "").split(";"))
    date = doc.get("date")
    date = _iso_date(date, "the page's date") if date else None
    title, prose = _post(_blocks(doc, _TRAFILATURA), doc.get("title"), _file_title(path), keep_code)
    return [Post(rel, title, date, tags, rel, prose)]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _entry_slug(entry, index: int) -> str:
    """Readable and stable: the last part of the entry's link or id, else its title."""
    for key in ("link", "id"):
        value = entry.get(key) or ""
        if "://" in value:
            parts = [p for p in urlparse(value).path.split("/") if p]
            value = PurePosixPath(parts[-1]).stem if parts else ""
        elif ":" in value:  # urn:uuid:..., tag:example.org,2024:...
            value = value.rsplit(":", 1)[1]
        slug = _slug(value)
        if slug:
            return slug
    return _slug(entry.get("title") or "") or f"entry-{index}"


def _entry_html(entry) -> str:
    contents = list(entry.get("content") or [])
    if entry.get("summary_detail"):
        contents.append(entry["summary_detail"])
    for content in contents:  # full content first; the summary only when there is nothing else
        value = content.get("value") or ""
        if not value.strip():
            continue
        if content.get("type", "text/html") in ("text/html", "application/xhtml+xml"):
            return value
        return "".join(f"<p>{html.escape(p)}</p>" for p in value.split("\n\n"))
    return ""


def _feed(path: Path, rel: str, data: bytes, keep_code: bool
          ) -> tuple[list[Post], list[Problem]]:
    import feedparser

    # a stream, not bytes or str: feedparser fetches a string that looks like a URL
    parsed = feedparser.parse(io.BytesIO(data))
    error = parsed.get("bozo_exception")
    if isinstance(error, (feedparser.CharacterEncodingOverride, feedparser.CharacterEncodingUnknown)):
        raise _Skip(f"encoding problem ({error}); save the feed as UTF-8 with "
                    "<?xml version=\"1.0\" encoding=\"utf-8\"?> as its first line")
    if not parsed.entries:
        if parsed.bozo:
            raise _Skip(f"not a readable RSS/Atom feed ({type(error).__name__}: {error}); fix "
                        "the XML or move the file out of the source folder")
        raise _Skip("feed has no entries; add <item> (RSS) or <entry> (Atom) elements or "
                    "move the file out of the source folder")
    posts, problems = [], []
    for i, entry in enumerate(parsed.entries, 1):
        slug = _entry_slug(entry, i)
        try:
            stamp = entry.get("published_parsed") or entry.get("updated_parsed")
            date = dt.date(*stamp[:3]).isoformat() if stamp else None
            title, prose = _post(_html_blocks(_entry_html(entry)), entry.get("title"),
                                 slug.replace("-", " "), keep_code)
        except _Skip as skip:
            # in a feed feedparser had to repair, the XML error is the likelier cause
            hint = f" (the feed's XML is malformed: {error})" if parsed.bozo else ""
            problems.append(Problem(rel, f"entry {i} ({slug}): {skip.reason}{hint}"))
            continue
        tags = _tag_list(t.get("term") or "" for t in entry.get("tags") or [])
        posts.append(Post(f"{rel}#{slug}", title, date, tags, rel, prose))
    return posts, problems


# ---------------------------------------------------------------------------------------------

def read_posts(source: str | Path, *, keep_code: bool = False, on_error: str = "skip"
               ) -> tuple[list[Post], list[Problem]]:
    """Every post under ``source`` (a folder, or one post or feed file), in sorted file order,
    and the problems found. With ``on_error="refuse"`` any problem raises a ``PostsError``
    listing all of them; with ``"skip"`` the bad files (or feed entries) are left out.
    Finding no post at all is always an error."""
    if on_error not in ("skip", "refuse"):
        raise PostsError([Problem("on_error", f"got {on_error!r}; expected 'skip' or 'refuse'")],
                         header="cannot read posts")
    folder, files, _ignored = source_files(source)
    posts: list[Post] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for path in files:
        rel = path.relative_to(folder).as_posix()
        suffix = path.suffix.lower()
        try:
            try:
                data = path.read_bytes()
            except OSError as err:
                raise _Skip(f"cannot read the file ({err.strerror or err}); check that it "
                            "exists and is readable")
            if suffix in FEEDS:
                found, bad = _feed(path, rel, data, keep_code)
                problems += bad
            elif suffix in MARKDOWN:
                found = _markdown(path, rel, _decode(data), keep_code)
            else:
                found = _html(path, rel, _decode(data), keep_code)
        except _Skip as skip:
            problems.append(Problem(rel, skip.reason))
            continue
        for post in found:
            if post.id in seen:
                problems.append(Problem(rel, f"duplicate post id {post.id!r}, already used by "
                                        f"the entry {seen[post.id]!r}; give each feed entry its "
                                        "own <guid>/<id> or link (this one is left out)"))
                continue
            seen[post.id] = post.title
            posts.append(post)
    if problems and on_error == "refuse":
        raise PostsError(problems, header=f"cannot read the posts in {source}")
    if not posts:
        problems = problems or [Problem(str(source), "no posts found; add .md, .html or feed "
                                        "files (" + ", ".join(SUPPORTED) + ")")]
        raise PostsError(problems, header=f"no usable posts in {source}")
    return posts, problems


# ---------------------------------------------------------------------------------------------
# passages

_HEADING = re.compile(r"(#{1,6}) (.*)")
_FENCE = re.compile(r"(`{3,})")
# a sentence ends at . ! ? (after any closing quotes or brackets) before white space, or at a
# line break (the lines of a list)
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*\s+(?=\S)|\n(?=\S)")


def _words(text: str) -> int:
    return len(text.split())


def _text_blocks(text: str) -> list[str]:
    """Paragraphs, headings and fenced code blocks of a post's text (code may hold blank lines)."""
    blocks, current, fence = [], [], None
    for line in text.split("\n"):
        if fence:
            current.append(line)
            if line.strip() == fence:
                blocks.append("\n".join(current))
                current, fence = [], None
            continue
        opening = _FENCE.match(line)
        if opening or _HEADING.fullmatch(line) or not line.strip():
            if current:
                blocks.append("\n".join(current))
            current = []
            if opening:
                fence, current = opening.group(1), [line]
            elif line.strip():
                blocks.append(line)
            continue
        current.append(line)
    if current:
        blocks.append("\n".join(current))
    return blocks


def _pieces(paragraph: str, max_words: int) -> list[str]:
    """A paragraph cut into pieces of at most max_words words: between sentences (or lines),
    a sentence longer than that between words, a code block between lines."""
    if _words(paragraph) <= max_words:
        return [paragraph]
    fence = _FENCE.match(paragraph)
    if fence:
        lines = paragraph.split("\n")
        opening, closing, body = lines[0], lines[-1], lines[1:-1]
        budget = max(1, max_words - _words(opening) - _words(closing))
        out, chunk = [], []
        for line in body:
            if chunk and _words("\n".join(chunk + [line])) > budget:
                out.append("\n".join([opening, *chunk, closing]))
                chunk = []
            chunk.append(line)
        out.append("\n".join([opening, *chunk, closing]))
        return out
    cuts = [0, *(m.end() for m in _SENTENCE_END.finditer(paragraph)), len(paragraph)]
    # each sentence as a span of the paragraph, so that a passage keeps the paragraph's spacing
    spans = [(a, b) for a, b in zip(cuts, cuts[1:]) if paragraph[a:b].strip()]
    out, start, n = [], None, 0
    for a, b in spans:
        sentence = paragraph[a:b].strip()
        words = _words(sentence)
        if words > max_words:  # one enormous sentence: cut between words
            if start is not None:
                out.append(paragraph[start:a].strip())
                start, n = None, 0
            tokens = sentence.split()
            out += [" ".join(tokens[i:i + max_words]) for i in range(0, len(tokens), max_words)]
            continue
        if start is not None and n + words > max_words:
            out.append(paragraph[start:a].strip())
            start, n = None, 0
        if start is None:
            start = a
        n += words
    if start is not None:
        out.append(paragraph[start:].strip())
    return out


def split_passages(post: Post, max_words: int, min_words: int = 40) -> list[Passage]:
    """The post's passages, in order: each section (the text under one heading) packed into
    passages of whole paragraphs of at most ``max_words`` words. A tiny last passage of a
    section (under ``min_words``) takes paragraphs from the one before it, or joins it when
    both fit in ``max_words``. Deterministic: the same post gives the same passages."""
    if max_words < 1 or min_words < 0:
        raise ValueError(f"max_words must be >= 1 and min_words >= 0, got {max_words}, {min_words}")
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    for block in _text_blocks(post.text):
        heading = _HEADING.fullmatch(block)
        if heading:
            sections.append((heading.group(2).strip(), []))
        else:
            sections[-1][1].append(block)
    passages: list[Passage] = []
    for heading, paragraphs in sections:
        # (text, paragraph index): pieces of one paragraph are rejoined with a space
        pieces = [(piece, i) for i, para in enumerate(paragraphs) for piece in _pieces(para, max_words)]
        chunks: list[list[tuple[str, int]]] = []
        count = 0
        for piece in pieces:
            n = _words(piece[0])
            if chunks and chunks[-1] and count + n <= max_words:
                chunks[-1].append(piece)
                count += n
            else:
                chunks.append([piece])
                count = n
        if len(chunks) > 1:
            size = lambda chunk: sum(_words(p[0]) for p in chunk)
            last, before = chunks[-1], chunks[-2]
            if size(last) < min_words and size(last) + size(before) <= max_words:
                chunks[-2:] = [before + last]
            else:
                # greedy packing leaves the remainder last: even it out, a piece at a time
                while (size(last) < min_words and len(before) > 1
                       and size(last) + _words(before[-1][0]) <= max_words
                       and size(before) - _words(before[-1][0]) >= min_words):
                    last.insert(0, before.pop())
        for chunk in chunks:
            text = chunk[0][0]
            for (piece, para), (_, prev) in zip(chunk[1:], chunk):
                text += (" " if para == prev else "\n\n") + piece
            n = len(passages) + 1
            key = json.dumps({"title": post.title, "heading": heading, "text": text},
                             ensure_ascii=False, sort_keys=True)
            passages.append(Passage(post.id, f"{post.id}#p{n}", heading, text,
                                    hashlib.sha256(key.encode("utf-8")).hexdigest()))
    return passages


def read_passages(source: str | Path, max_words: int, min_words: int, *, keep_code: bool = False,
                  on_error: str = "skip") -> tuple[list[Post], list[Passage], list[Problem]]:
    """The posts of ``source`` (``read_posts``), all their passages in order, and the problems
    (the posts skipped): what the stages that generate from posts (ingest, rewrite) start from."""
    posts, problems = read_posts(source, keep_code=keep_code, on_error=on_error)
    return posts, [x for post in posts for x in split_passages(post, max_words, min_words)], problems
