// A small Markdown renderer for model output that cannot inject HTML.
//
// Model output is untrusted text. This never builds HTML from strings: `markdownTree` parses the
// text into plain nodes ({tag, children, attrs} or strings), and `renderMarkdown` makes DOM nodes
// from them with createElement and text nodes only. Text stays text, so `<script>` or
// `<img onerror=…>` in the output shows as those characters. The only attributes ever set are a
// link's href (http, https or mailto only, else the link is left as plain text) and a code block's
// language class (letters, digits, + and - only).
//
// What it understands (what chat models write): paragraphs (a single newline is a line break),
// # headings, fenced ``` code blocks (an unclosed fence, as while streaming, runs to the end),
// - / * / 1. lists, > quotes, --- rules, and inline `code`, **bold**, *italic*, _italic_,
// ~~strike~~ and [links](https://…).

const SAFE_SCHEMES = new Set(["http:", "https:", "mailto:"]);

const FENCE = /^\s*```\s*([\w+-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^\s*>\s?(.*)$/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;

// Inline spans, tried at every position; the earliest match wins, ties go to the earlier row.
const INLINE = [
  { re: /`([^`\n]+)`/, node: (m) => ({ tag: "code", children: [m[1]] }) },
  { re: /\*\*(?=\S)([\s\S]*?\S)\*\*/, node: (m) => ({ tag: "strong", children: inline(m[1]) }) },
  { re: /__(?=\S)([\s\S]*?\S)__/, node: (m) => ({ tag: "strong", children: inline(m[1]) }) },
  { re: /~~(?=\S)([\s\S]*?\S)~~/, node: (m) => ({ tag: "del", children: inline(m[1]) }) },
  { re: /\*(?=[^\s*])([^*]*?[^\s*])\*/, node: (m) => ({ tag: "em", children: inline(m[1]) }) },
  { re: /(?<!\w)_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/, node: (m) => ({ tag: "em", children: inline(m[1]) }) },
  { re: /\[([^\]\n]+)\]\(([^()\s]+)\)/, node: (m) => link(m[1], m[2], m[0]) },
];

function safeHref(url) {
  try {
    const parsed = new URL(url); // relative URLs throw: a model has no business linking into this page
    return SAFE_SCHEMES.has(parsed.protocol) ? parsed.href : null;
  } catch {
    return null;
  }
}

function link(label, url, source) {
  const href = safeHref(url);
  if (href === null) return source; // a javascript: or data: link stays the text it was
  return { tag: "a", attrs: { href, rel: "noopener noreferrer nofollow", target: "_blank" }, children: inline(label) };
}

/** Inline nodes of one run of text: strings and {tag, children} spans. */
export function inline(text) {
  const out = [];
  let rest = text;
  while (rest) {
    let best = null;
    for (const rule of INLINE) {
      const m = rule.re.exec(rest);
      if (m && (best === null || m.index < best.m.index)) best = { m, rule };
    }
    if (best === null) {
      out.push(rest);
      break;
    }
    if (best.m.index > 0) out.push(rest.slice(0, best.m.index));
    out.push(best.rule.node(best.m));
    rest = rest.slice(best.m.index + best.m[0].length);
  }
  return out;
}

// A paragraph's lines, with a line break between them.
function lines(texts) {
  return texts.flatMap((t, i) => (i ? [{ tag: "br", children: [] }, ...inline(t)] : inline(t)));
}

/** Block nodes of a whole text: [{tag, children, attrs?}] (strings only inside). */
export function markdownTree(text) {
  const src = String(text).replace(/\r\n?/g, "\n").split("\n");
  const blocks = [];
  let i = 0;
  while (i < src.length) {
    const line = src[i];
    let m;
    if (!line.trim()) {
      i += 1;
    } else if ((m = FENCE.exec(line))) {
      const body = [];
      for (i += 1; i < src.length && !FENCE.test(src[i]); i += 1) body.push(src[i]);
      i += 1; // the closing fence (or past the end)
      const attrs = m[1] ? { class: `language-${m[1]}` } : {};
      blocks.push({ tag: "pre", children: [{ tag: "code", attrs, children: [body.join("\n")] }] });
    } else if ((m = HEADING.exec(line))) {
      blocks.push({ tag: `h${m[1].length}`, children: inline(m[2]) });
      i += 1;
    } else if (RULE.test(line)) {
      blocks.push({ tag: "hr", children: [] });
      i += 1;
    } else if (QUOTE.test(line)) {
      const body = [];
      for (; i < src.length && (m = QUOTE.exec(src[i])); i += 1) body.push(m[1]);
      blocks.push({ tag: "blockquote", children: markdownTree(body.join("\n")) });
    } else if ((m = ITEM.exec(line))) {
      const ordered = /\d/.test(m[2]);
      const items = [];
      while (i < src.length) {
        const item = ITEM.exec(src[i]);
        if (item && /\d/.test(item[2]) === ordered) {
          items.push([item[3]]);
        } else if (src[i].trim() && /^\s+/.test(src[i]) && items.length) {
          items[items.length - 1].push(src[i].trim()); // an indented continuation of the item
        } else {
          break;
        }
        i += 1;
      }
      const list = { tag: ordered ? "ol" : "ul", children: items.map((t) => ({ tag: "li", children: lines(t) })) };
      const start = Number.parseInt(m[2], 10);
      if (ordered && start !== 1) list.attrs = { start: String(start) };
      blocks.push(list);
    } else {
      const para = [];
      for (; i < src.length && src[i].trim(); i += 1) {
        if (para.length && (FENCE.test(src[i]) || HEADING.test(src[i]) || QUOTE.test(src[i]) || ITEM.test(src[i]))) break;
        para.push(src[i]);
      }
      blocks.push({ tag: "p", children: lines(para) });
    }
  }
  return blocks;
}

// Attributes a node may carry, and what their values must look like.
const ALLOWED_ATTRS = {
  href: (v) => safeHref(v) !== null,
  rel: () => true,
  target: (v) => v === "_blank",
  class: (v) => /^language-[\w+-]+$/.test(v),
  start: (v) => /^\d+$/.test(v),
};

function toDom(node, doc) {
  if (typeof node === "string") return doc.createTextNode(node);
  const el = doc.createElement(node.tag);
  for (const [name, value] of Object.entries(node.attrs || {})) {
    if (ALLOWED_ATTRS[name] && ALLOWED_ATTRS[name](value)) el.setAttribute(name, value);
  }
  for (const child of node.children) el.append(toDom(child, doc));
  return el;
}

/** A DocumentFragment showing `text` as Markdown; nothing in `text` becomes markup of its own. */
export function renderMarkdown(text, doc = document) {
  const fragment = doc.createDocumentFragment();
  for (const block of markdownTree(text)) fragment.append(toDom(block, doc));
  return fragment;
}
