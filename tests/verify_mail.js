// Reads {"dns": {name: record}, "messages": [base64, ...]} on stdin and writes, for each
// message, what Node's mailauth says of its DKIM signatures and what mailparser reads
// in it (tests/test_differential.py compares both with what the job asked for).
"use strict";
const { dkimVerify } = require("mailauth");
const { simpleParser } = require("mailparser");
const crypto = require("crypto");

async function main() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const input = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  const resolver = async (name, type) => {
    const record = input.dns[name.replace(/\.$/, "")];
    if (type !== "TXT" || record === undefined) {
      const error = new Error("not found: " + name);
      error.code = "ENOTFOUND";
      throw error;
    }
    const strings = [];
    for (let i = 0; i < record.length; i += 255) strings.push(record.slice(i, i + 255));
    return [strings];
  };
  const out = [];
  for (const encoded of input.messages) {
    const message = Buffer.from(encoded, "base64");
    const verified = await dkimVerify(message, { resolver });
    const parsed = await simpleParser(message, { skipHtmlToText: true, skipTextToHtml: true, skipTextLinks: true });
    const addresses = (field) => [].concat(field || []).flatMap((f) => f.value || [])
      .map((a) => ({ name: a.name, address: a.address }));
    out.push({
      dkim: verified.results.map((r) => ({ result: r.status.result, comment: r.status.comment || "",
                                           domain: r.signingDomain, selector: r.selector, algo: r.algo })),
      subject: parsed.subject === undefined ? null : parsed.subject,
      from: addresses(parsed.from), to: addresses(parsed.to), cc: addresses(parsed.cc),
      reply_to: addresses(parsed.replyTo),
      text: parsed.text === undefined ? null : parsed.text,
      html: parsed.html === false || parsed.html === undefined ? null : parsed.html,
      attachments: parsed.attachments.map((a) => ({ filename: a.filename === undefined ? null : a.filename,
        content_type: a.contentType, sha256: crypto.createHash("sha256").update(a.content).digest("hex") })),
    });
  }
  process.stdout.write(JSON.stringify(out));
}

main().catch((error) => { process.stderr.write(String(error && error.stack || error) + "\n"); process.exit(1); });
