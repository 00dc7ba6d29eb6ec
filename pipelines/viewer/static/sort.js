// Sortable tables: a click on a heading sorts the rows by that column (numbers numerically, empty cells last);
// a second click reverses the order. A heading with data-first="desc" (the slide score) sorts highest first.
"use strict";
document.querySelectorAll("table.sortable").forEach((table) => {
  const headings = Array.from(table.tHead.rows[0].cells);
  headings.forEach((th, column) => {
    if (!th.dataset.type) return;                     // not a sortable column
    th.addEventListener("click", () => {
      const descending = th.dataset.order ? th.dataset.order === "asc" : th.dataset.first === "desc";
      headings.forEach((h) => delete h.dataset.order);
      th.dataset.order = descending ? "desc" : "asc";
      const numeric = th.dataset.type === "number";
      const body = table.tBodies[0];
      const rows = Array.from(body.rows);
      const key = (row) => row.cells[column].dataset.value ?? row.cells[column].textContent;
      rows.sort((a, b) => {
        const x = key(a), y = key(b);
        if (x === "" || y === "") return (x === "") - (y === "");          // empty last, whatever the order
        const order = numeric ? Number(x) - Number(y) : x.localeCompare(y, undefined, {numeric: true});
        return descending ? -order : order;
      });
      rows.forEach((row) => body.appendChild(row));
    });
  });
});
