// A small SVG line-plot writer for run comparisons: stacked panels sharing one legend, each with
// axes, "nice" ticks, labels, polylines and point markers. Self-contained output (no scripts, no
// external fonts or styles), so the file opens in any browser.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace nibble::train {

struct PlotLine {
  std::vector<double> x, y;  // same length; non-finite points are left out
  size_t color = 0;          // index into Figure::legend (one color per run)
  bool markers = false;      // true: a circle per point (e.g. validation losses) instead of a polyline
};

struct PlotPanel {
  std::string title, x_label, y_label;
  std::vector<PlotLine> lines;
  bool zero_line = false;  // draw y = 0 (for relative gaps)
};

struct Figure {
  std::vector<std::string> legend;  // label of each color index
  std::vector<PlotPanel> panels;    // drawn top to bottom
};

// About `target` round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi].
std::vector<double> nice_ticks(double lo, double hi, int target);
// A short tick label: 1500000 -> "1.5M", 0.25 -> "0.25".
std::string tick_label(double v);
// The whole SVG document.
std::string render_svg(const Figure& figure);

}  // namespace nibble::train
