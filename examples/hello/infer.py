"""A text model with no dependencies: greets someone."""

import cog


class Model(cog.Model):
    """Say hello."""

    def setup(self):
        self.greeting = "Hello"

    @cog.input("name", type=str, default="world", help="Who to greet")
    @cog.input("punctuation", type=str, default=".", options=[".", "!", "?"], help="How to end")
    @cog.input("times", type=int, default=1, min=1, max=5, help="How many greetings")
    @cog.input("shout", type=bool, default=False, help="Upper case")
    def run(self, name, punctuation, times, shout):
        text = " ".join([f"{self.greeting}, {name}{punctuation}"] * times)
        return text.upper() if shout else text
