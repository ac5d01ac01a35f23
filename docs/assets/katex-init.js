// Render the math that pymdownx.arithmatex (generic mode) leaves in .arithmatex elements.
// Material's instant navigation swaps pages without reloading scripts: document$ emits on every
// page, so subscribe to it when present and fall back to a plain load event otherwise.
(function () {
  function renderMath() {
    if (typeof renderMathInElement !== "function") {
      return;
    }
    document.querySelectorAll(".arithmatex").forEach(function (element) {
      renderMathInElement(element, {
        delimiters: [
          { left: "\\(", right: "\\)", display: false },
          { left: "\\[", right: "\\]", display: true }
        ],
        throwOnError: false
      });
    });
  }

  if (typeof document$ !== "undefined" && typeof document$.subscribe === "function") {
    document$.subscribe(renderMath);
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", renderMath);
  } else {
    renderMath();
  }
})();
