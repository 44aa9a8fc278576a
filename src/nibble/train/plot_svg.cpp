// SVG line plots: see plot_svg.h.
#include "nibble/train/plot_svg.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>

namespace nibble::train {
namespace {

constexpr double kWidth = 900, kPanelHeight = 330, kLegendHeight = 34, kLegendRow = 18;
constexpr double kLeft = 78, kRight = 24, kTop = 34, kBottom = 52;  // plot area margins inside a panel
// Colorblind-friendly (Okabe-Ito); runs beyond eight reuse them.
const char* const kColors[] = {"#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"};

const char* color(size_t i) { return kColors[i % (sizeof kColors / sizeof kColors[0])]; }

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", v);
  return buf;
}

struct Range {
  double lo = std::numeric_limits<double>::infinity(), hi = -std::numeric_limits<double>::infinity();
  void add(double v) {
    if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
  }
  // An empty or zero-width range is widened so that the mapping below never divides by zero.
  void settle() {
    if (!(lo <= hi)) lo = 0, hi = 1;
    if (lo == hi) {
      const double pad = lo == 0 ? 1 : std::abs(lo) * 0.05;
      lo -= pad, hi += pad;
    }
  }
};

void draw_panel(std::ostringstream& svg, const PlotPanel& p, double top) {
  Range xr, yr;
  for (const PlotLine& l : p.lines)
    for (size_t i = 0; i < l.x.size() && i < l.y.size(); ++i)
      if (std::isfinite(l.x[i]) && std::isfinite(l.y[i])) xr.add(l.x[i]), yr.add(l.y[i]);
  if (p.zero_line) yr.add(0);
  if (xr.lo > 0 && xr.lo <= 0.05 * xr.hi) xr.lo = 0;  // steps and tokens start near 0: show the origin
  xr.settle();
  yr.settle();
  const double y_pad = (yr.hi - yr.lo) * 0.04;  // keep markers off the frame
  yr.lo -= y_pad, yr.hi += y_pad;
  const double x0 = kLeft, x1 = kWidth - kRight, y0 = top + kTop, y1 = top + kPanelHeight - kBottom;
  const auto px = [&](double x) { return x0 + (x - xr.lo) / (xr.hi - xr.lo) * (x1 - x0); };
  const auto py = [&](double y) { return y1 - (y - yr.lo) / (yr.hi - yr.lo) * (y1 - y0); };

  svg << "<text x=\"" << num((x0 + x1) / 2) << "\" y=\"" << num(top + 22)
      << "\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">" << escape(p.title) << "</text>\n";
  for (double t : nice_ticks(xr.lo, xr.hi, 8)) {
    svg << "<line x1=\"" << num(px(t)) << "\" y1=\"" << num(y0) << "\" x2=\"" << num(px(t)) << "\" y2=\"" << num(y1)
        << "\" stroke=\"#e4e4e4\"/>\n";
    svg << "<text x=\"" << num(px(t)) << "\" y=\"" << num(y1 + 16) << "\" text-anchor=\"middle\">" << tick_label(t)
        << "</text>\n";
  }
  for (double t : nice_ticks(yr.lo, yr.hi, 6)) {
    svg << "<line x1=\"" << num(x0) << "\" y1=\"" << num(py(t)) << "\" x2=\"" << num(x1) << "\" y2=\"" << num(py(t))
        << "\" stroke=\"#e4e4e4\"/>\n";
    svg << "<text x=\"" << num(x0 - 6) << "\" y=\"" << num(py(t) + 4) << "\" text-anchor=\"end\">" << tick_label(t)
        << "</text>\n";
  }
  if (p.zero_line)
    svg << "<line x1=\"" << num(x0) << "\" y1=\"" << num(py(0)) << "\" x2=\"" << num(x1) << "\" y2=\"" << num(py(0))
        << "\" stroke=\"#808080\" stroke-dasharray=\"4 3\"/>\n";
  svg << "<rect x=\"" << num(x0) << "\" y=\"" << num(y0) << "\" width=\"" << num(x1 - x0) << "\" height=\""
      << num(y1 - y0) << "\" fill=\"none\" stroke=\"#333\"/>\n";
  svg << "<text x=\"" << num((x0 + x1) / 2) << "\" y=\"" << num(y1 + 38) << "\" text-anchor=\"middle\">"
      << escape(p.x_label) << "</text>\n";
  svg << "<text transform=\"translate(" << num(x0 - 56) << " " << num((y0 + y1) / 2)
      << ") rotate(-90)\" text-anchor=\"middle\">" << escape(p.y_label) << "</text>\n";

  for (const PlotLine& l : p.lines) {
    std::string points;
    for (size_t i = 0; i < l.x.size() && i < l.y.size(); ++i) {
      if (!std::isfinite(l.x[i]) || !std::isfinite(l.y[i])) continue;
      if (l.markers) {
        svg << "<circle cx=\"" << num(px(l.x[i])) << "\" cy=\"" << num(py(l.y[i])) << "\" r=\"3.5\" fill=\""
            << color(l.color) << "\" stroke=\"#fff\" stroke-width=\"0.8\"/>\n";
      } else {
        if (!points.empty()) points += ' ';
        points += num(px(l.x[i])) + "," + num(py(l.y[i]));
      }
    }
    if (!l.markers)
      svg << "<polyline fill=\"none\" stroke=\"" << color(l.color) << "\" stroke-width=\"1.6\" points=\"" << points
          << "\"/>\n";
  }
}

}  // namespace

std::vector<double> nice_ticks(double lo, double hi, int target) {
  if (!std::isfinite(lo) || !std::isfinite(hi) || target < 1) return {};
  if (hi < lo) std::swap(lo, hi);
  if (hi == lo) return {lo};
  const double raw = (hi - lo) / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double f = raw / mag;
  const double step = (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * mag;
  std::vector<double> ticks;
  // Multiples of the step (not a running sum), so labels come out as round numbers.
  for (double k = std::ceil(lo / step - 1e-9); k * step <= hi + step * 1e-9; k += 1)
    ticks.push_back(k == 0 ? 0.0 : k * step);
  return ticks;
}

std::string tick_label(double v) {
  char buf[32];
  const double a = std::abs(v);
  if (a >= 1e9)
    std::snprintf(buf, sizeof buf, "%.4gG", v / 1e9);
  else if (a >= 1e6)
    std::snprintf(buf, sizeof buf, "%.4gM", v / 1e6);
  else if (a >= 1e4)
    std::snprintf(buf, sizeof buf, "%.4gk", v / 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.4g", v);
  return buf;
}

std::string render_svg(const Figure& f) {
  // Legend: one swatch and label per color, in rows that wrap at the figure's width (labels are
  // sized at ~7 px a character, enough for the 12 px sans-serif font).
  struct Entry {
    double x, y;
  };
  std::vector<Entry> at;
  double x = kLeft, y = 18;
  for (const std::string& label : f.legend) {
    const double w = 40 + 7.0 * static_cast<double>(label.size());
    if (x > kLeft && x + w > kWidth - kRight) x = kLeft, y += kLegendRow;
    at.push_back({x, y});
    x += w;
  }
  const double legend_height = kLegendHeight + (at.empty() ? 0.0 : at.back().y - 18);
  const double height = legend_height + kPanelHeight * static_cast<double>(f.panels.size());
  std::ostringstream svg;
  svg << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << kWidth << "\" height=\"" << height
      << "\" viewBox=\"0 0 " << kWidth << " " << height << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
      << "<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n";
  for (size_t i = 0; i < f.legend.size(); ++i) {
    svg << "<rect x=\"" << num(at[i].x) << "\" y=\"" << num(at[i].y - 6) << "\" width=\"18\" height=\"4\" fill=\""
        << color(i) << "\"/>\n";
    svg << "<text x=\"" << num(at[i].x + 24) << "\" y=\"" << num(at[i].y) << "\">" << escape(f.legend[i]) << "</text>\n";
  }
  for (size_t i = 0; i < f.panels.size(); ++i) draw_panel(svg, f.panels[i], legend_height + kPanelHeight * i);
  svg << "</svg>\n";
  return svg.str();
}

}  // namespace nibble::train
