// Module answers with the server's verdict: calibrated confidence and "none of these".
import assert from "node:assert/strict";
import { test } from "node:test";

import { parseModules, parseVerdict, toPicks } from "../modules";

void test("a rated hit shows its confidence instead of the raw score", () => {
  const answer = {
    modules: [
      { id: "shop.acct_book", uri: "file:///r/shop/acct_book.py", score: 0.35, reason: "close in meaning", confidence: "high" },
      { id: "shop.report", uri: "file:///r/shop/report.py", score: 0.21, reason: "", confidence: 7 },
    ],
    confidence: "high",
    abstained: false,
    message: "",
  };
  const picks = toPicks(parseModules(answer));
  assert.equal(picks[0]?.description, "high confidence");
  assert.equal(picks[1]?.description, "score 0.21"); // not a level: the score as before
  assert.deepEqual(parseVerdict(answer), { confidence: "high", abstained: false, message: "" });
});

void test("an abstained answer carries its message; an older server's answer never abstains", () => {
  const verdict = parseVerdict({
    modules: [],
    confidence: "none",
    abstained: true,
    message: "no module clearly does 'send invoices'; closest: shop.mailer",
  });
  assert.equal(verdict.abstained, true);
  assert.match(verdict.message, /^no module clearly does 'send invoices'; closest: shop\.mailer$/);
  assert.deepEqual(parseVerdict({ modules: [] }), { confidence: "", abstained: false, message: "" });
  assert.deepEqual(parseVerdict(null), { confidence: "", abstained: false, message: "" });
  assert.equal(parseVerdict({ abstained: "yes" }).abstained, false);
});
