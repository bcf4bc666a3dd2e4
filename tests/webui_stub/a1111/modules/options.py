"""Mirrors modules/options.py of AUTOMATIC1111 1.10 (also Forge's): OptionInfo, options_section, Options."""

import json
import os
from dataclasses import dataclass


class OptionInfo:
    """One setting: same constructor and chainable helpers as the WebUI's."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None,
                 section=None, refresh=None, comment_before="", comment_after="", infotext=None,
                 restrict_api=False, category_id=None):  # fmt: skip
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.do_not_save = False
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def needs_restart(self):
        self.comment_after += " <span class='info'>(requires restart)</span>"
        return self

    def needs_reload_ui(self):
        self.comment_after += " <span class='info'>(requires Reload UI)</span>"
        return self


def options_section(section_identifier, options_dict):
    """(id, label) sets the section; (id, label, category_id) also sets the category."""
    for value in options_dict.values():
        if len(section_identifier) == 2:
            value.section = section_identifier
        elif len(section_identifier) == 3:
            value.section = section_identifier[0:2]
            value.category_id = section_identifier[2]
    return options_dict


@dataclass
class OptionsCategory:
    id: str
    label: str


class OptionsCategories:
    def __init__(self):
        self.mapping = {}

    def register_category(self, category_id, label):
        if category_id not in self.mapping:
            self.mapping[category_id] = OptionsCategory(category_id, label)
        return category_id


categories = OptionsCategories()
categories.register_category("training", "Training")


class Options:
    """Setting values in `data` (loaded from config.json), their OptionInfo in `data_labels`."""

    builtin_fields = frozenset({"data_labels", "data", "filename"})

    def __init__(self, data_labels, filename):
        self.data_labels = data_labels
        self.filename = filename
        self.data = {k: v.default for k, v in data_labels.items()}

    def __setattr__(self, key, value):
        if key in Options.builtin_fields:
            return super().__setattr__(key, value)
        if key in self.data or key in self.data_labels:
            self.data[key] = value
            return None
        return super().__setattr__(key, value)

    def __getattr__(self, item):
        if item in Options.builtin_fields:
            return super().__getattribute__(item)
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        return super().__getattribute__(item)

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default

    def set(self, key, value):
        """Set a value and call its onchange (what the Settings page's Apply does); True when it changed."""
        if self.data.get(key) == value:
            return False
        self.data[key] = value
        option = self.data_labels.get(key)
        if option is not None and option.onchange is not None:
            option.onchange()
        return True

    def load(self):
        try:
            with open(self.filename, encoding="utf8") as file:
                self.data = json.load(file)
        except FileNotFoundError:
            self.data = {}

    def save(self):
        os.makedirs(os.path.dirname(self.filename), exist_ok=True)
        with open(self.filename, "w", encoding="utf8") as file:
            json.dump(self.data, file, indent=4)
